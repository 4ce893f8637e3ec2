import copy
import time

import pytest
import torch
from transformers import DINOv3ViTModel

from conftest import tiny_model
from pcamx.evaluation.footprint import count_params, gflops, latency_ms, memory_mb, throughput_ips
from pcamx.model import PCamClassifier, architecture

# Hand counts for DINOv3 ViT-S/16 (d=384, MLP 1536, 12 layers, 4 registers, key_bias=False).
D, H, LAYERS, PATCH = 384, 1536, 12, 16
TOKENS_224 = (224 // PATCH) ** 2 + 1 + 4  # patches + CLS + registers = 201

LAYER_PARAMS = (
    (4 * D * D + 3 * D)  # q/k/v/o projections, no key bias
    + 2 * 2 * D  # norm1, norm2
    + 2 * D  # layer scales
    + ((D * H + H) + (H * D + D))  # MLP
)
EMBED_PARAMS = 3 * PATCH * PATCH * D + D + D + D + 4 * D  # patch conv, CLS, mask token, registers
BACKBONE_PARAMS = LAYERS * LAYER_PARAMS + EMBED_PARAMS + 2 * D  # + final norm
HEAD_PARAMS = D * 2 + 2


@pytest.fixture(scope="module")
def vits16() -> PCamClassifier:
    torch.manual_seed(0)
    backbone = DINOv3ViTModel(architecture("vits16"))
    backbone.config._attn_implementation = "sdpa"
    return PCamClassifier(backbone, D)


@pytest.fixture
def tiny() -> PCamClassifier:
    return tiny_model(num_hidden_layers=1)


def test_params_vits16(vits16):
    # The 21.60M reference holds for both: the 770-parameter head doesn't move the rounding.
    assert count_params(vits16.backbone) == BACKBONE_PARAMS == 21_596_544
    assert count_params(vits16) == BACKBONE_PARAMS + HEAD_PARAMS == 21_597_314
    assert round(count_params(vits16.backbone) / 1e6, 2) == 21.60
    assert round(count_params(vits16) / 1e6, 2) == 21.60


def test_params_counts_frozen(tiny):
    total = count_params(tiny)
    tiny.backbone.requires_grad_(False)
    assert count_params(tiny) == total


def test_gflops_vits16(vits16, capsys):
    # Module hooks only: Linear (+bias), patch Conv2d (+bias), LayerNorm (1 op/element);
    # the attention core, RoPE and GELU are not counted. Whole model, head included.
    linear_macs_per_token = 4 * D * D + 3 * D + (D * H + H) + (H * D + D)
    macs = (
        LAYERS * TOKENS_224 * linear_macs_per_token
        + (224 // PATCH) ** 2 * (3 * PATCH * PATCH * D + D)  # patch embedding
        + (2 * LAYERS + 1) * TOKENS_224 * D  # LayerNorms
        + (D * 2 + 2)  # head
    )
    assert macs == 4_335_184_514
    g = gflops(vits16, 224)
    assert g == pytest.approx(2 * macs / 1e9, rel=1e-12)
    assert round(g, 2) == 8.67
    assert capsys.readouterr() == ("", "")


def test_gflops_ignores_attention_kernel(vits16):
    # Same figure with eager attention (explicit matmuls + softmax) as with SDPA.
    sdpa = gflops(vits16, 224)
    vits16.config._attn_implementation = "eager"
    try:
        assert gflops(vits16, 224) == sdpa
    finally:
        vits16.config._attn_implementation = "sdpa"


def test_gflops_are_affine_in_the_token_count(tiny):
    # Every counted module (linears, LayerNorms, the patch conv) costs a fixed amount per token or per
    # patch, and patches = tokens − 5 (CLS + 4 registers): so GFLOPs are affine in tokens. Tokens at
    # 32 / 48 / 64 px: 4 + 5 = 9, 9 + 5 = 14, 16 + 5 = 21.
    g32, g48, g64 = gflops(tiny, 32), gflops(tiny, 48), gflops(tiny, 64)
    assert (g64 - g32) / (g48 - g32) == pytest.approx((21 - 9) / (14 - 9), rel=1e-9)


def test_gflops_restores_model_state(tiny):
    tiny.train()
    tiny.backbone.embeddings.eval()
    gflops(tiny, 32)
    assert tiny.training and tiny.backbone.training and tiny.head.training
    assert not tiny.backbone.embeddings.training
    # ptflops' helpers and counters must not be left behind on the caller's modules.
    for m in tiny.modules():
        assert not any(k.startswith("__") or "flops" in k for k in vars(m)), type(m).__name__
    assert next(tiny.parameters()).device.type == "cpu"


def test_gflops_bf16(tiny):
    f32 = gflops(tiny, 32)
    assert gflops(copy.deepcopy(tiny).to(torch.bfloat16), 32) == f32


@pytest.mark.cuda
def test_gflops_on_cuda_returns_model_home(tiny):
    assert gflops(tiny, 32, device="cuda") == gflops(tiny, 32)
    assert next(tiny.parameters()).device.type == "cpu"


def test_gflops_error_is_raised(capsys):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gflops(Broken(), 32)


def test_memory_vits16(vits16):
    assert round(memory_mb(vits16), 1) == 86.5
    assert round(memory_mb(copy.deepcopy(vits16).to(torch.bfloat16)), 1) == 43.3
    # Serialisation overhead is small next to the raw tensor bytes.
    assert memory_mb(vits16) == pytest.approx(count_params(vits16) * 4 / 1e6, rel=2e-3)


class Sleeper(torch.nn.Module):
    """A forward that takes a known time and records what it was given."""

    def __init__(self, seconds: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.seconds, self.weight, self.inputs = seconds, torch.nn.Parameter(torch.zeros(1, dtype=dtype)), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append((x.dtype, x.shape[0], self.training))
        time.sleep(self.seconds)
        return x


def test_latency_and_throughput_measure_the_forward():
    model = Sleeper(0.01).train()
    ms = latency_ms(model, torch.randn(1, 3, 8, 8), warmup=1, iters=5)
    assert 10 <= ms < 40  # one forward sleeps 10 ms
    ips = throughput_ips(model, torch.randn(4, 3, 8, 8), warmup=1, iters=5)
    assert 100 < ips <= 400  # 4 images per 10 ms at best
    assert model.training and {training for _, _, training in model.inputs} == {False}  # eval mode, restored
    assert len(model.inputs) == 1 + 5 + 1 + 5  # warm-up and timed forwards, nothing more


def test_latency_casts_input_to_model_dtype():
    model = Sleeper(0.0, torch.bfloat16)
    latency_ms(model, torch.randn(1, 3, 8, 8), warmup=0, iters=1)
    assert model.inputs == [(torch.bfloat16, 1, False)]
