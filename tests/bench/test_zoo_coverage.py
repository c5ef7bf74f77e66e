"""benchmarks/zoo_coverage.py: what `fusion_advisor.patch` swaps in the zoo's model families, by what
their modules compute (tiny configs, CPU). Each family below once got less than this."""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("zoo_coverage", ROOT / "benchmarks" / "zoo_coverage.py")
coverage_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage_mod)
zoo = sys.modules["zoo"]

EXPECTED = {
    # name: (module swaps, function patches) that must be there
    "gemma": ({"GemmaRMSNorm -> RMSNorm": 3, "GemmaMLP -> GEGLUMLP": 1}, ["apply_rotary_pos_emb (rope)"]),
    "phi3": ({"Phi3RMSNorm -> RMSNorm": 3, "Phi3MLP -> PackedGatedMLP": 1}, ["loss_function (this instance) (cross_entropy)"]),
    "bert": ({"LayerNorm -> LayerNorm": 4}, ["CrossEntropyLoss (cross_entropy)"]),
    "t5-v1.1": ({"T5LayerNorm -> RMSNorm": 7, "T5DenseGatedActDense -> GEGLUMLP": 2},
                ["CrossEntropyLoss (cross_entropy)"]),
    # outside the GPU zoo: a Llama-shaped MLP under its own class name, taken by its shape
    "olmo2": ({"Olmo2RMSNorm -> RMSNorm": 5, "Olmo2MLP -> SwiGLUMLP": 1}, ["apply_rotary_pos_emb (rope)"]),
    # beyond the zoo: GroupNorm subclasses (checked on channels-second inputs), conv blocks that pad first,
    # a loss module held as an attribute
    "poolformer": ({"PoolFormerGroupNorm -> GroupNorm": 9}, []),
    "efficientnet": ({"EfficientNetDepthwiseLayer -> EfficientNetDepthwiseLayer": 8,
                      "EfficientNetEmbeddings -> EfficientNetEmbeddings": 1}, []),
    "distilbert": ({"CrossEntropyLoss -> CrossEntropyLoss": 1, "LayerNorm -> LayerNorm": 4}, []),
    "modernbert": ({"ModernBertMLP -> PackedGatedMLP": 1}, ["apply_rotary_pos_emb (rope)"]),
    "nemotron": ({"NemotronLayerNorm1P -> LayerNorm1P": 3}, ["apply_rotary_pos_emb (rope)"]),
    # `nn.CrossEntropyLoss()` built inside forward: reached through the modeling module's `nn`
    "electra": ({"LayerNorm -> LayerNorm": 4}, ["nn (cross_entropy)"]),
}


@pytest.fixture(scope="module")
def patterns():
    return coverage_mod.runtime_patterns()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_family_gets_its_norms_mlps_and_losses(name, patterns):
    swaps, functions = EXPECTED[name]
    row = coverage_mod.coverage(coverage_mod.FAMILIES[name], patterns)
    assert {k: row["swapped"].get(k) for k in swaps} == swaps, row
    assert set(functions) <= set(row["functions"]), row
    assert not any("numerics check failed" in why for why in row["left"]), row["left"]
    assert row["never_called"] == [], row["calls"]


def test_gpt_neox_partial_rotary_reaches_the_kernel(patterns):
    """GPT-NeoX rotates a quarter of each head: its apply_rotary_pos_emb was patched, and every call
    went back to the original (the H100 zoo, 2026-12-07: verify's "rope never ran"). One tiny step
    must now call the kernel, the norms and the loss too."""
    row = coverage_mod.coverage(coverage_mod.FAMILIES["gpt-neox"], patterns)
    assert row["calls"]["rope"] >= 1 and row["calls"]["layer_norm"] >= 1, row["calls"]
    assert row["never_called"] == [], row["calls"]


def test_convnext_norms_both_ways_and_what_is_left_says_why(patterns):
    row = coverage_mod.coverage(zoo.BY_NAME["convnext"], patterns)
    assert row["swapped"]["ConvNextLayerNorm -> LayerNorm"] == 4                   # channels_last
    assert row["swapped"]["ConvNextLayerNorm -> ChannelsFirstLayerNorm"] == 4      # over dim 1 of NCHW
    assert not any(k.startswith("ConvNextLayerNorm") for k in row["left"]), row["left"]
    assert any(k.startswith("GELUActivation: ") and "one op" in k for k in row["left"]), row["left"]


def test_the_script_prints_every_family_asked_and_writes_json(tmp_path):
    out = tmp_path / "coverage.json"
    assert coverage_mod.main(["--models", "llama,resnet", "--json", str(out)]) == 0
    import json
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["llama", "resnet"]
    # HF ResNet: each ResNetConvLayer with a ReLU becomes BN -> ReLU fused; the ones without an
    # activation (a block's last conv, the shortcut) are left, saying so. Its classifier (10 labels: a
    # misaligned width) runs padded.
    assert rows[1]["swapped"] == {"ResNetConvLayer -> ResNetConvLayer": 5, "Linear -> PaddedLinear": 1}, rows[1]
    assert all("activation" in why for why in rows[1]["left"]), rows[1]["left"]


@pytest.mark.parametrize("name,config,blocks,graphs", [
    ("t5-v1.1", None, 4, 4),   # each stack's first block holds the relative position bias: two graphs a stack
    # the zoo's ResNet at its real widths and depths (32 x 32 images): the last stage holds 61 % of the
    # parameters, and is compiled all the same
    ("resnet", {"num_labels": 10}, 4, 4),
])
def test_compiled_blocks_take_every_block_without_a_graph_break(name, config, blocks, graphs):
    spec = coverage_mod.FAMILIES[name]
    if config is not None:
        spec = dataclasses.replace(spec, tiny=config)
    row = coverage_mod.blocks(spec)
    assert (row["instances"], row["graphs"], row["graph_breaks"], row["skipped"]) == (blocks, graphs, 0, []), row


def test_the_nn_of_a_module_that_builds_its_loss_from_it_is_swapped_and_put_back():
    import torch
    import transformers
    from transformers.models.bert import modeling_bert
    from transformers.models.electra import modeling_electra

    import fusion_advisor
    from fusion_advisor.kernels.cross_entropy import CrossEntropyLoss, builds_nn_cross_entropy
    from transformers.models.beit import modeling_beit
    electra_mlm = {modeling_electra.ElectraForMaskedLM}
    assert builds_nn_cross_entropy(vars(modeling_electra), electra_mlm)
    # BERT builds its loss from the CrossEntropyLoss it imported: its `nn` is not a site
    assert not builds_nn_cross_entropy(vars(modeling_bert), {modeling_bert.BertForMaskedLM})
    # BEiT's masked-image-modeling head builds one, its image classifier does not: a classifier's `nn` is left alone
    assert builds_nn_cross_entropy(vars(modeling_beit), {modeling_beit.BeitForMaskedImageModeling})
    assert not builds_nn_cross_entropy(vars(modeling_beit), {modeling_beit.BeitForImageClassification})
    # the same for the imported name: MobileNetV2's segmentation head builds CrossEntropyLoss(), its classifier not
    from transformers.models.mobilenet_v2 import modeling_mobilenet_v2 as mobilenet
    from fusion_advisor.kernels.cross_entropy import builds_loss
    assert builds_loss("CrossEntropyLoss")(vars(mobilenet), {mobilenet.MobileNetV2ForSemanticSegmentation})
    assert not builds_loss("CrossEntropyLoss")(vars(mobilenet), {mobilenet.MobileNetV2ForImageClassification})
    assert builds_loss("CrossEntropyLoss")(vars(modeling_bert), {modeling_bert.BertForMaskedLM})
    # ELECTRA's masked-LM head builds it through nn: the CrossEntropyLoss it also imports is not a site
    assert not builds_loss("CrossEntropyLoss")(vars(modeling_electra), electra_mlm)

    class Head(torch.nn.Module):   # a loss built in __init__ is a module, swapped as one: not a site either
        def __init__(self):
            super().__init__()
            self.loss = torch.nn.CrossEntropyLoss()
    Head.__module__ = "a_modeling_module"
    assert not builds_nn_cross_entropy({"__name__": "a_modeling_module", "nn": torch.nn, "Head": Head}, {Head})
    config, _ = coverage_mod.FAMILIES["electra"].scaled(tiny=True)
    model = transformers.ElectraForMaskedLM(transformers.ElectraConfig(**config))
    handle = fusion_advisor.patch(model, patterns=["cross_entropy"])
    assert isinstance(modeling_electra.nn.CrossEntropyLoss(), CrossEntropyLoss)
    assert modeling_electra.nn.Linear is torch.nn.Linear          # every other name is torch.nn's
    handle.revert()
    assert modeling_electra.nn is torch.nn
