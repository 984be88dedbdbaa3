"""The served-checkpoint manifest a sync checks its buckets against (no server: a folder on disk)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from alp_megatron.bridge.weight_sync import ManifestError, ServedManifest


def served(folder, tie_word_embeddings):
    tensors = {"model.embed_tokens.weight": torch.zeros(8, 4), "model.norm.weight": torch.zeros(4),
               "lm_head.weight": torch.zeros(8, 4)}  # saved even when tied, as some checkpoints do
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": tie_word_embeddings}))
    return str(folder)


def exported():
    return [("model.embed_tokens.weight", torch.ones(8, 4)), ("model.norm.weight", torch.ones(4))]


def test_a_tied_checkpoints_saved_lm_head_is_not_required(tmp_path):
    ServedManifest(served(tmp_path, tie_word_embeddings=True)).check(exported(), last=True)


def test_an_untied_lm_head_that_no_bucket_carries_is_named(tmp_path):
    with pytest.raises(ManifestError, match=r"not exported: \['lm_head.weight'\]"):
        ServedManifest(served(tmp_path, tie_word_embeddings=False)).check(exported(), last=True)


def test_unknown_names_and_wrong_shapes_are_named_before_sending(tmp_path):
    manifest = ServedManifest(served(tmp_path, tie_word_embeddings=True))
    with pytest.raises(ManifestError) as error:
        manifest.check([("model.norm.weight", torch.ones(5)), ("model.extra.weight", torch.ones(1))], last=False)
    assert "model.norm.weight has shape (5,), the served model (4,)" in str(error.value)
    assert "model.extra.weight is not a tensor of the served model" in str(error.value)
