"""Learngene files: save/load round trip and every manifest check."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.learngene import Learngene
from lgframe.models.registry import create_model


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("DiT-Pico/2")
    c = get_constraint("svd")
    c.attach(model)
    lg = c.learngene(model)
    st, js = lg.save(tmp_path / "lg.safetensors")
    return lg, st, js


def test_round_trip_and_manifest(saved):
    lg, st, js = saved
    back = Learngene.load(st, constraint="svd", family="dit")
    assert back.tensors.keys() == lg.tensors.keys()
    assert all(torch.equal(back.tensors[k], lg.tensors[k]) for k in lg.tensors)
    m = json.loads(js.read_text())
    assert m["format_version"] == 1 and m["constraint"]["name"] == "svd" and m["model"]["family"] == "dit"
    assert m["roles"]["attn.qkv.weight"] == [4, 192, 64]
    assert m["bytes"]["learngene"] == lg.bytes("learngene") > 0
    assert all(len(t["sha256"]) == 64 for t in m["tensors"].values())
    # U, V of 4 roles: (192+64)*64 + (64+64)*64 + (256+64)*64 * 2 floats
    assert lg.bytes("learngene") == 4 * 64 * (256 + 128 + 320 + 320)


def test_manifest_embedded_in_tensor_file(saved):
    lg, st, js = saved
    js.unlink()
    assert Learngene.load(st).constraint == "svd"


def test_wrong_constraint_or_family(saved):
    _, st, _ = saved
    with pytest.raises(LgframeError, match="made by constraint 'svd', but 'tucker' was expected"):
        Learngene.load(st, constraint="tucker")
    with pytest.raises(LgframeError, match="comes from a 'dit' model and cannot initialize a 'vit'"):
        Learngene.load(st, family="vit")
    vit = create_model("ViT-Pico/2")
    with pytest.raises(LgframeError, match="cannot initialize a 'vit' model"):
        get_constraint("svd").descend(Learngene.load(st), vit)


def test_unknown_version(saved):
    _, st, js = saved
    m = json.loads(js.read_text())
    m["format_version"] = 99
    js.write_text(json.dumps(m))
    with pytest.raises(LgframeError, match="format version 99; this lgframe reads version 1"):
        Learngene.load(st)


def test_hash_mismatch_is_refused(saved):
    _, st, _ = saved
    tensors = load_file(st)
    key = "learngene/attn.qkv.weight/U"
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, st)
    with pytest.raises(LgframeError, match="tensor 'learngene/attn.qkv.weight/U' has SHA-256"):
        Learngene.load(st)


def test_missing_and_garbage_files(tmp_path, saved):
    with pytest.raises(LgframeError, match="does not exist"):
        Learngene.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LgframeError, match="not a readable safetensors file"):
        Learngene.load(bad)


def test_scratch_has_no_learngene():
    with pytest.raises(LgframeError, match="no learngene"):
        get_constraint("scratch").learngene(create_model("DiT-Pico/2"))
