"""Learngene files: `NAME.safetensors` (tensors) + `NAME.json` (manifest), or a
hub-style folder of them (`save_pretrained`: learngene.safetensors, learngene.json
and a README.md model card).

Tensor names carry their group:
- `learngene/<role>/<factor>`: the size-agnostic tensors (shared by layers and sizes);
- `scalers/<role>/<factor>`: the ancestor's size-specific tensors, kept so a
  descendant can start from them (e.g. sigma interpolated over depth);
- `rest/<param>`: the ancestor's free parameters, for the `rest: select` policy.

The manifest records the constraint and its options, the format version, the
model family and ancestor config, role shapes, bytes per group and the SHA-256
of every tensor; loading checks all of them. The manifest is also embedded in
the safetensors metadata so the tensor file alone is self-describing. An optional
`about` records where the learngene came from (run, data, figures), when known;
it describes and is not checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lgframe.errors import LgframeError
from lgframe.formats.files import atomic_dir, read_safetensors, save_tensors, write_json, write_text

log = logging.getLogger("lgframe")

FORMAT = "lgframe.learngene"
FORMAT_VERSION = 1
GROUPS = ("learngene", "scalers", "rest")
FOLDER_TENSORS, FOLDER_MANIFEST, FOLDER_CARD = "learngene.safetensors", "learngene.json", "README.md"


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def paths_for(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def check_manifest(m: dict, where) -> None:
    """Every field of a learngene manifest, with its type; a missing or malformed one
    names the key and the manifest version."""
    version = m.get("format_version")

    def bad(key: str, valid: str):
        raise LgframeError(f"learngene manifest '{where}' (format version {version!r}): key '{key}' {valid}; the "
                           "manifest was edited or is damaged. Re-extract the learngene.")

    spec = {
        "constraint": dict, "constraint.name": str, "constraint.options": dict, "model": dict, "model.family": str,
        "model.ancestor_config": dict, "roles": dict, "bytes": dict, "tensors": dict,
    }
    for key, typ in spec.items():
        node: object = m
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                bad(key, "is missing")
            node = node[part]
        if not isinstance(node, typ):
            bad(key, f"must be a {typ.__name__}, not {type(node).__name__}")
    for role, shape in m["roles"].items():
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d >= 1 for d in shape)):
            bad(f"roles.{role}", f"is {shape!r}; it must be [L, m, n], three positive integers")
    depth = m["model"]["ancestor_config"].get("depth")
    if isinstance(depth, int):
        for role, shape in m["roles"].items():
            if shape[0] != depth:
                bad(f"roles.{role}", f"has {shape[0]} layers, but the ancestor config has depth {depth}")
    for g in m["bytes"]:
        if g not in GROUPS or not isinstance(m["bytes"][g], int):
            bad(f"bytes.{g}", f"is not a byte count of one of the groups {', '.join(GROUPS)}")
    for k, entry in m["tensors"].items():
        group, _, rest = k.partition("/")
        if group not in GROUPS:
            bad(f"tensors.{k}", f"does not start with one of the groups {', '.join(GROUPS)}")
        if group in ("learngene", "scalers"):
            role = rest.rpartition("/")[0]
            if role not in m["roles"]:
                bad(f"tensors.{k}", f"belongs to role '{role}', which is not in roles ({', '.join(m['roles'])})")
        if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("sha256"), str)):
            bad(f"tensors.{k}", "must hold shape (a list), dtype and sha256 (strings)")
    if not isinstance(m.get("about", {}), dict):
        bad("about", f"must be a mapping (where the learngene came from), not {type(m['about']).__name__}")


# ------------------------------------------------------------------ hub-style folders
@contextmanager
def pretrained_folder(folder: str | os.PathLike, own: dict[str, Callable[[Path], bool] | None],
                      what: str) -> Iterator[Path]:
    """A temporary folder beside `folder`, renamed to `folder` once written (`atomic_dir`).

    `folder` may be missing, empty, or an earlier folder of this kind, which is then
    replaced: it holds only files named in `own`, and the first of them (the marker,
    e.g. config.json) is there and passes its check. Anything else is a user's folder
    (their notes, a git clone, a timm export): refused, and left exactly as it is."""
    p = Path(folder)
    if p.is_dir() and any(p.iterdir()):
        marker, check = next(iter(own.items()))
        foreign = sorted(x.name for x in p.iterdir() if x.name not in own or not x.is_file())
        if foreign:
            why = f"it holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}, which lgframe did not write"
        elif not (p / marker).is_file() or (check is not None and not check(p / marker)):
            why = f"its {marker} is missing or was not written by lgframe"
        else:
            why = None
        if why:
            raise LgframeError(f"'{p}' exists and is not an lgframe {what} ({why}); it is left as it is. lgframe "
                               f"replaces only a {what} it wrote: choose a new folder, or empty this one first.")
    with atomic_dir(p, replace=True) as tmp:
        yield tmp


def _json_format(path: Path) -> str | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj.get("format") if isinstance(obj, dict) else None


def _is_card(path: Path) -> bool:
    try:
        head = path.read_text(errors="replace")[:2000]
    except OSError:
        return False
    return head.startswith("---\n") and "\nlibrary_name: lgframe\n" in head


def _cell(v) -> str:
    """A value for a Markdown table cell: strings as they are, the rest as compact JSON."""
    text = v if isinstance(v, str) else json.dumps(v, separators=(", ", ": "))
    return text.replace("|", "\\|").replace("\n", " ")


def _yaml_str(v: str) -> str:
    return v if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) else json.dumps(v)


def _table(rows: list[tuple], head: tuple) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]


def model_card(lg: Learngene, name: str = "LEARNGENE_FOLDER") -> str:
    """The README.md of a learngene folder: YAML front matter as Hugging Face cards have it
    (library_name: lgframe, tags), then the constraint and its options, the ancestor's
    config, the tensors, the data and figures of its run when `lg.about` has them, and
    how to descend it. `name` is the folder's name, for the commands shown."""
    a = lg.ancestor_config
    family = {"dit": "DiT", "vit": "ViT"}.get(lg.family, lg.family)
    task = {"dit": "image-generation", "vit": "image-classification"}.get(lg.family)
    tags = ["lgframe", "learngene", lg.constraint, lg.family] + ([task] if task else [])
    depth = a.get("depth")
    smaller = max(1, depth // 2) if isinstance(depth, int) else 2
    size = ", ".join(f"{k} {a[k]}" for k in ("depth", "width", "heads") if k in a)
    lines = ["---", "library_name: lgframe", "tags:", *[f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)], "---", "",
             f"# {lg.constraint} learngene of a {family} ({size})", "",
             f"A learngene: the size-agnostic part of an ancestor {family} trained under the `{lg.constraint}` "
             "constraint, from which lgframe initializes descendant models of other sizes (see the "
             "lgframe README: learngenes, descend).", "",
             "## Use", "", "```python", "import lgframe", "",
             f'lg = lgframe.Learngene.from_pretrained("{name}")',
             f"model = lgframe.descend(lg, depth={smaller})  # or a size name: descend(lg, \"{family}-Pico/2\")", "```", "",
             "or on the command line:", "", "```",
             f"lgframe descend {name} --model depth={smaller} --out descendant.safetensors", "```", "",
             "## Constraint", "", f"`{lg.constraint}`, with the options it was trained with:", "",
             *_table(sorted(lg.options.items()), ("option", "value")), "",
             "## Ancestor model", "", f"Family `{lg.family}`; its config:", "",
             *_table(sorted(a.items()), ("key", "value")), "",
             "## Tensors", "",
             *_table([(g, len(lg.group(g)), f"{lg.bytes(g):,}") for g in GROUPS], ("group", "tensors", "bytes")), "",
             *_table([(r, *s) for r, s in sorted(lg.roles.items())], ("role", "layers L", "m", "n")), ""]
    lines += ["## Data and training", ""] + _about_lines(lg.about)
    lines += ["", "## Files", "",
              f"- `{FOLDER_TENSORS}`: the tensors (`learngene/`, `scalers/`, `rest/` by group); the manifest is also "
              "in its safetensors metadata.",
              f"- `{FOLDER_MANIFEST}`: the manifest: constraint and options, ancestor config, role shapes, bytes per "
              "group and the SHA-256 of every tensor; loading checks all of them.",
              f"- `{FOLDER_CARD}`: this card, generated by lgframe (saving the learngene again rewrites it).", ""]
    return "\n".join(lines)


def _about_lines(about: dict) -> list[str]:
    if not about:
        return ["Not recorded: this learngene was saved without its run. Extract it from its checkpoint "
                "(`lgframe learngene CHECKPOINT --folder --out FOLDER`, or `lgframe.extract_learngene(CHECKPOINT)`) "
                "to record the data and the run's figures here."]
    labels = {"run": "run folder", "file": "extracted from", "recipe": "recipe", "task": "task", "data": "data",
              "max_steps": "steps (recipe)", "global_step": "steps (checkpoint)", "ema": "EMA weights"}
    def shown(k, v):
        if k == "data" and isinstance(v, dict) and "name" in v:  # digits (classes [0, 3])
            more = ", ".join(f"{x} {_cell(y)}" for x, y in v.items() if x != "name")
            return f"{v['name']} ({more})" if more else v["name"]
        return ("yes" if v else "no") if isinstance(v, bool) else v

    rows = [(labels[k], shown(k, about[k])) for k in labels if k in about]
    rows += [(k, v) for k, v in sorted(about.items()) if k not in labels and k != "metrics"]
    out = _table(rows, ("what", "value"))
    metrics = about.get("metrics") or {}
    if metrics:
        out += ["", "Validation figures of the run (optimizer steps):", ""]
        out += _table([(k, f"{pts[0][1]:.4g} (step {pts[0][0]})", f"{pts[-1][1]:.4g} (step {pts[-1][0]})")
                       for k, pts in sorted(metrics.items()) if pts], ("metric", "first", "last"))
    return out


@dataclass
class Learngene:
    constraint: str
    options: dict
    family: str
    ancestor_config: dict
    roles: dict[str, list[int]]  # role -> [L, m, n]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    about: dict = field(default_factory=dict)  # where it came from (run, data, figures), when known; not checked

    def group(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of one group, names without the group prefix."""
        pre = name + "/"
        return {k[len(pre):]: v for k, v in self.tensors.items() if k.startswith(pre)}

    def rest_for(self, model) -> dict[str, torch.Tensor]:
        """The free ("rest") tensors for a descendant `model`, adapted to its data:

        * a learned-sigma DiT ancestor (out_channels = 2 x in_channels, e.g. an
          imported DiT-XL-2-256) descending to a model that predicts the noise
          only gives its final layer's noise rows;
        * tensors tied to the data's geometry or label set (patch embedding when
          channels or patch size differ, output layer, class table or head when
          the classes differ, position table when the token grid differs) are left
          out, so the descendant keeps its fresh init there, and a log line says so.
        """
        rest = dict(self.group("rest"))
        a, b = self.ancestor_config, getattr(getattr(model, "config", None), "to_dict", dict)()
        if not b:
            return rest
        a_out = a.get("out_channels") or a.get("in_channels")
        b_out = b.get("out_channels") or b.get("in_channels")
        if self.family == "dit" and a_out != b_out and a_out == 2 * a.get("in_channels") and b_out == a.get("in_channels"):
            for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
                if name in rest:
                    rows = torch.arange(rest[name].shape[0])
                    rest[name] = rest[name][rows % a_out < b_out]
            a_out = b_out

        def differs(*keys):
            return [f"{k} {a.get(k)} -> {b.get(k)}" for k in keys if a.get(k) != b.get(k)]

        grid = lambda c: (c.get("image_size") or 0) // max(1, c.get("patch_size") or 1)  # noqa: E731
        tied = {  # names -> what must match
            "dit": [(("x_embedder.proj.weight",), differs("in_channels", "patch_size")),
                    (("final_layer.linear.weight", "final_layer.linear.bias"),
                     differs("patch_size") + ([f"out_channels {a_out} -> {b_out}"] if a_out != b_out else [])),
                    (("y_embedder.embedding_table.weight",), differs("num_classes")),
                    (("pos_embed",), [] if grid(a) == grid(b) else [f"token grid {grid(a)} -> {grid(b)}"])],
            "vit": [(("patch_embed.proj.weight",), differs("in_channels", "patch_size")),
                    (("head.weight", "head.bias"), differs("num_classes")),
                    (("pos_embed",), [] if grid(a) == grid(b) else [f"token grid {grid(a)} -> {grid(b)}"])],
        }.get(self.family, [])
        for names, why in tied:
            dropped = [n for n in names if n in rest and why]
            for n in dropped:
                del rest[n]
            if dropped:
                log.info("descendant keeps its fresh %s (%s)", ", ".join(dropped), "; ".join(why))
        return rest

    def bytes(self, group: str | None = None) -> int:
        return sum(
            t.numel() * t.element_size()
            for k, t in self.tensors.items()
            if group is None or k.startswith(group + "/")
        )

    def manifest(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "constraint": {"name": self.constraint, "options": self.options},
            "model": {"family": self.family, "ancestor_config": self.ancestor_config},
            "roles": self.roles,
            "bytes": {g: self.bytes(g) for g in GROUPS},
            "tensors": {
                k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sha256": tensor_sha256(t)}
                for k, t in sorted(self.tensors.items())
            },
        } | ({"about": self.about} if self.about else {})

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        st, js = paths_for(path)
        bad = [k for k in self.tensors if k.split("/", 1)[0] not in GROUPS]
        if bad:
            raise ValueError(f"learngene tensor names must start with one of {GROUPS}: {bad[:3]}")
        manifest = self.manifest()
        save_tensors(st, self.tensors, {"lgframe_learngene": json.dumps(manifest)})
        write_json(js, manifest)
        return st, js

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """A hub-style folder: `learngene.safetensors` and `learngene.json` (what `save`
        writes) and `README.md`, a model card (`model_card`). Written to a temporary
        folder beside, then renamed: an interrupted save leaves no half folder. An
        existing folder is replaced only when it is an earlier learngene folder (those
        three files and nothing else; an edited card is rewritten); any other folder
        raises LgframeError and is left untouched. Returns the folder."""
        own = {FOLDER_MANIFEST: lambda f: _json_format(f) == FORMAT, FOLDER_TENSORS: None, FOLDER_CARD: _is_card}
        with pretrained_folder(folder, own, "learngene folder") as tmp:
            self.save(tmp / FOLDER_TENSORS)
            write_text(tmp / FOLDER_CARD, model_card(self, Path(folder).name))
        return Path(folder)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, constraint: str | None = None,
                        family: str | None = None) -> Learngene:
        """The learngene of a folder written by `save_pretrained` (or a run folder, which
        holds learngene.safetensors and .json too), verified as `load` does."""
        p = Path(folder)
        if not (p / FOLDER_TENSORS).is_file():
            hint = (f" It holds a model (config.json): extract its learngene with `lgframe learngene {p} --folder "
                    "--out FOLDER`." if (p / "config.json").is_file() else "")
            raise LgframeError(f"'{p}' is not a learngene folder: it has no {FOLDER_TENSORS}.{hint}")
        return cls.load(p / FOLDER_TENSORS, constraint, family)

    @classmethod
    def load(
        cls, path: str | os.PathLike, constraint: str | None = None, family: str | None = None
    ) -> Learngene:
        """Load and verify a learngene file (or folder: `from_pretrained`). `constraint` /
        `family`, when given, must match the manifest."""
        p = Path(path)
        if p.is_dir() and ((p / FOLDER_TENSORS).is_file() or not paths_for(p)[0].is_file()):  # NAME/, not NAME.safetensors
            return cls.from_pretrained(p, constraint, family)
        st, js = paths_for(path)
        tensors, meta = read_safetensors(st, "learngene file")
        if js.is_file():
            try:
                manifest = json.loads(js.read_text())
            except json.JSONDecodeError as e:
                raise LgframeError(f"learngene manifest '{js}' is not valid JSON ({e}).") from None
        elif "lgframe_learngene" in meta:
            manifest = json.loads(meta["lgframe_learngene"])
        else:
            raise LgframeError(f"learngene '{st}' has no manifest: expected '{js}' beside it.")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            got = manifest.get("format") if isinstance(manifest, dict) else None
            raise LgframeError(f"'{js}' is not an lgframe learngene manifest (format {got!r}).")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise LgframeError(
                f"learngene '{st}' has format version {manifest.get('format_version')!r}; "
                f"this lgframe reads version {FORMAT_VERSION}."
            )
        check_manifest(manifest, st if not js.is_file() else js)
        name = manifest["constraint"]["name"]
        if constraint is not None and name != constraint:
            raise LgframeError(
                f"learngene '{st}' was made by constraint '{name}', but '{constraint}' was expected; "
                f"descend it with constraint '{name}'."
            )
        fam = manifest["model"]["family"]
        if family is not None and fam != family:
            raise LgframeError(
                f"learngene '{st}' comes from a '{fam}' model and cannot initialize a '{family}' model."
            )
        listed = manifest["tensors"]
        if set(listed) != set(tensors):
            raise LgframeError(
                f"learngene '{st}' does not match its manifest: tensors missing from the file "
                f"{sorted(set(listed) - set(tensors))[:5]}, not in the manifest {sorted(set(tensors) - set(listed))[:5]}."
            )
        for k, t in tensors.items():
            entry = listed[k]
            dtype = str(t.dtype).replace("torch.", "")
            if list(t.shape) != entry["shape"] or dtype != entry["dtype"]:
                raise LgframeError(
                    f"learngene '{st}': tensor '{k}' is {dtype} {list(t.shape)} in the file, but the manifest says "
                    f"{entry['dtype']} {entry['shape']}; the file or the manifest was changed. Re-extract it."
                )
            if tensor_sha256(t) != entry["sha256"]:
                raise LgframeError(
                    f"learngene '{st}': tensor '{k}' has SHA-256 {tensor_sha256(t)[:12]}..., the manifest expects "
                    f"{listed[k]['sha256'][:12]}...; the file is corrupt or was changed. Re-extract it."
                )
        lg = cls(name, manifest["constraint"]["options"], fam, manifest["model"]["ancestor_config"], manifest["roles"],
                 tensors)
        for g in GROUPS:
            if lg.bytes(g) != manifest["bytes"].get(g, 0):
                raise LgframeError(
                    f"learngene '{st}': the manifest says the {g} group holds {manifest['bytes'].get(g, 0):,} bytes, "
                    f"the tensors hold {lg.bytes(g):,}; the manifest was changed. Re-extract it."
                )
        return cls(
            constraint=name,
            options=manifest["constraint"]["options"],
            family=fam,
            ancestor_config=manifest["model"]["ancestor_config"],
            roles=manifest["roles"],
            tensors=tensors,
            about=manifest.get("about", {}),
        )
