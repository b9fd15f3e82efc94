"""torch.compile sees tokenforge ops as custom ops with fake implementations: a model using them
compiles with fullgraph=True (zero graph breaks), forward and backward, and computes the same."""

import pytest
import torch
from device_params import DEVICES, kernel_backends

import tokenforge
from tokenforge import kernels
from tokenforge.testing import rel_error


class TinyBlock(torch.nn.Module):
    def __init__(self, dim, backend):
        super().__init__()
        self.norm = tokenforge.nn.RMSNorm(dim, backend=backend)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = tokenforge.nn.RMSNorm(dim, elementwise_affine=False, backend=backend)

    def forward(self, x):
        return self.norm2(x + self.proj(self.norm(x)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_fullgraph_compile_forward_backward(device, compile_backend):
    torch._dynamo.reset()
    for backend in kernel_backends(device):
        model = TinyBlock(48, backend).to(device)
        with torch.no_grad():
            model.norm.weight.copy_(torch.randn(48))
        x = torch.randn(2, 5, 48, device=device, requires_grad=True)

        eager_out = model(x)
        eager_out.sum().backward()
        eager_grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
        x.grad = None
        model.zero_grad()

        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        out = compiled(x)
        out.sum().backward()
        grads = [x.grad] + [p.grad for p in model.parameters()]
        assert rel_error(out, eager_out) < 1e-5
        for g, ref in zip(grads, eager_grads):
            assert rel_error(g, ref) < 1e-5


def test_no_graph_breaks_reported():
    torch._dynamo.reset()
    backend = "triton" if kernels.INTERPRETED else None
    model = TinyBlock(32, backend)
    explanation = torch._dynamo.explain(model)(torch.randn(3, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_custom_ops_have_fake_implementations():
    """The ops pass torch.library's own consistency checks (schema, fake impl, autograd)."""
    x = torch.randn(4, 16)
    w = torch.randn(16)
    backend = "triton" if kernels.INTERPRETED else "torch"
    if backend == "torch":
        pytest.skip("the custom ops wrap kernel backends; none runs on CPU without TRITON_INTERPRET=1")
    torch.library.opcheck(torch.ops.tokenforge.rms_norm_fwd, (x, w, 1e-6, backend),
                          test_utils=("test_schema", "test_faketensor"))
    y, rstd = torch.ops.tokenforge.rms_norm_fwd(x, w, 1e-6, backend)
    torch.library.opcheck(torch.ops.tokenforge.rms_norm_bwd, (torch.randn(4, 16), x, w, rstd, backend),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.tokenforge.rms_norm_fwd, (x, None, 1e-6, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_backend_checks_trace_without_graph_breaks():
    """Every backend's availability check (imports, the extension's status, GPU facts) is a
    constant to dynamo, so a traced op can ask about any backend, forced or not."""
    from tokenforge import backends

    def probe(x):
        reasons = [backends.why_not("rms_norm", b, x, None) for b in backends.BACKENDS]
        return x + len([r for r in reasons if r is None])

    torch._dynamo.reset()
    x = torch.randn(3, 8)
    out = torch.compile(probe, fullgraph=True, backend="eager")(x)
    assert torch.equal(out, probe(x))
