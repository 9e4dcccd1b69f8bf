"""DivControl: controllable generation with a control branch factorized into
condition-agnostic learngenes and condition-specific tailors (Xie et al.,
"DivControl: Knowledge Diversion for Controllable Image Generation", 2025).

No code is public; everything below is lgframe's reading of the abstract
(shared/seeds/003_f738e1dc2c046fec.txt), carried to lgframe's DiT:

1. **Control branch (ControlNet on a DiT).** A trainable copy of the first N
   blocks of a frozen pretrained DiT. Its input is the frozen DiT's token
   embedding of the noisy image plus a zero-initialized patch embedding of the
   condition image; after copied block i a zero-initialized Linear (width x
   width) adds its output to the output of block i of the frozen DiT (the
   ControlNet-Transformer layout of PixArt-delta, one residual per copied
   block). Both zero layers make the controlled model *equal* to the base at
   step 0 (bit for bit: x + 0). The condition enters only through the branch;
   the class label and timestep reach the branch through the frozen DiT's own
   conditioning vector c (adaLN), shared with the base.

2. **Conditions and instructions** (`conditions.py`): operators computed from
   the data and re-applicable to samples (edges, lowres, mask, blur, outline,
   negative),
   each with one parameter. An instruction is one setting or several composed;
   its embedding is built from the operator's attributes alone (family presence
   and normalized parameter), so an unseen setting, an unseen combination, or a
   family no run has trained on is described in the same space. DivControl
   reads text instructions with a language model; an 8x8 toy has no use for one.

3. **DivControl factorization.** "factorizes ControlNet via SVD into basic
   components ... learngenes and tailors": every Linear inside the copied blocks
   (qkv, attention out, MLP in and out, adaLN modulation) is put in kind's form
   (`lgframe.strategies.kind`, reused, not copied): W^l = U_G diag(s_G^l) V_G^T
   + U_T diag(g * s_T^l) V_T^T, the learngene components always on, k_T tailor
   components per condition family (kind's classes are the families). The zero
   layers and the condition patch embedding stay dense (lgframe's policy for
   zero-initialized layers: free parameters). By default the components start
   from kind's decomposition of the copied weights (`init: copy`, the copy
   ControlNet keeps; with two or more blocks the shared U, V cannot hold them
   exactly, see DESIGN "Dense models into constrained form"); `init: random` is
   KIND's random SVD form. "a dynamic gate that performs soft routing over
   tailors based on the semantics of condition instructions": the gate is
   g = softmax(W e + b) over the families' tailor groups, per sample, from the
   instruction embedding e (kind's hard class gate replaced, as the DESIGN
   reading of DivControl says); kind's bank takes it per sample
   (`InstructionGateBank`, a subclass overriding where the gate comes from), so
   one batch mixes conditions in one pass. The gate starts on the hard pattern
   (a family's own group at logit 4, kind's soft-gate start).

4. **Representation alignment** "aligns condition embeddings with early diffusion
   features": the branch's tokens after `align_from` blocks pass a 2-layer MLP
   head and are aligned by cosine with the frozen DiT's tokens of the *clean*
   image (t = 0, the same label) after `align_block` blocks (REPA's loss, with
   the frozen DiT as the encoder); `align_weight` (recipe) scales it. The head
   is trained with the branch and kept frozen in adaptation.

5. **Zero-shot and few-shot.** Zero-shot: an instruction never trained on goes
   through the trained gate (an unseen parameter value, an unseen combination:
   the gate mixes the known families' tailors). Few-shot (`adapt`): a new
   family gets a new tailor group (random orthonormal components at sigma 0) and
   a gate row that routes its instruction there and every other instruction
   away; only the tailors and the gate train from K examples, the old tailor
   components are kept exactly (gradient masked, restored after each step),
   every other tensor is frozen.

Baselines (benchmarks/divcontrol.py): one dense branch per condition family
(the usual way), and one dense branch shared by all conditions without a gate.

Modules: `conditions` (operators, instructions, fidelity), `model` (branch,
kind with an instruction gate, the controlled DiT), `run` (recipe, task,
train / adapt / sample, the control file).
"""

from .conditions import FAMILIES, Instruction, fidelity, parse_instruction
from .model import ControlBranch, ControlledDiT, ControlSpec, DivControlKind, InstructionGate, InstructionGateBank
from .run import (
    ControlCfg,
    ControlTask,
    load_control,
    load_control_recipe,
    prepare_adaptation,
    run_control_adapt,
    run_control_sample,
    run_control_train,
    save_control,
    with_new_family,
)

__all__ = [
    "FAMILIES", "Instruction", "fidelity", "parse_instruction",
    "ControlBranch", "ControlledDiT", "ControlSpec", "DivControlKind", "InstructionGate", "InstructionGateBank",
    "ControlCfg", "ControlTask", "load_control", "load_control_recipe", "prepare_adaptation", "run_control_adapt",
    "run_control_sample", "run_control_train", "save_control", "with_new_family",
]
