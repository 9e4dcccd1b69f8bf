"""Learngene files: `NAME.safetensors` (tensors) + `NAME.json` (manifest).

Tensor names carry their group:
- `learngene/<role>/<factor>`: the size-agnostic tensors (shared by layers and sizes);
- `scalers/<role>/<factor>`: the ancestor's size-specific tensors, kept so a
  descendant can start from them (e.g. sigma interpolated over depth);
- `rest/<param>`: the ancestor's free parameters, for the `rest: select` policy.

The manifest records the constraint and its options, the format version, the
model family and ancestor config, role shapes, bytes per group and the SHA-256
of every tensor; loading checks all of them. The manifest is also embedded in
the safetensors metadata so the tensor file alone is self-describing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lgframe.errors import LgframeError
from lgframe.formats.files import read_safetensors, save_tensors, write_json

log = logging.getLogger("lgframe")

FORMAT = "lgframe.learngene"
FORMAT_VERSION = 1
GROUPS = ("learngene", "scalers", "rest")


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


@dataclass
class Learngene:
    constraint: str
    options: dict
    family: str
    ancestor_config: dict
    roles: dict[str, list[int]]  # role -> [L, m, n]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

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
        }

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        st, js = paths_for(path)
        bad = [k for k in self.tensors if k.split("/", 1)[0] not in GROUPS]
        if bad:
            raise ValueError(f"learngene tensor names must start with one of {GROUPS}: {bad[:3]}")
        manifest = self.manifest()
        save_tensors(st, self.tensors, {"lgframe_learngene": json.dumps(manifest)})
        write_json(js, manifest)
        return st, js

    @classmethod
    def load(
        cls, path: str | os.PathLike, constraint: str | None = None, family: str | None = None
    ) -> Learngene:
        """Load and verify. `constraint` / `family`, when given, must match the manifest."""
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
        )
