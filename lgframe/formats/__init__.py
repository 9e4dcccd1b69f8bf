"""File formats and serialization, the lowest layer: atomic writes and outputs that
never destroy what a user has (`files`), torch checkpoints and distributed-checkpoint
folders read without running code (`checkpoints`), learngene files with their
manifests (`learngene`) and latents folders (`latents`). Nothing here knows about
models, constraints or training.
"""
