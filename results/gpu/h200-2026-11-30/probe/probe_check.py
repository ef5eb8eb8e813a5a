"""The batched chunk path on CUDA (float64) against the per-chunk path on CPU, forward and vjp."""
import torch
from mora.adapters.mora import add_delta_, delta_vjp_, delta_weight
worst = 0.0
for comp in ("rope", "decouple"):
    for d_in, d_out, size in ((1024, 1024, 128), (1024, 2816, 174), (2816, 1024, 174), (40, 24, 6), (24, 40, 6), (5, 7, 12), (37, 19, 6)):
        torch.manual_seed(0)
        M, x = torch.randn(size, size, dtype=torch.float64), torch.randn(50, d_in, dtype=torch.float64)
        g, base = torch.randn(50, d_out, dtype=torch.float64), torch.randn(50, d_out, dtype=torch.float64)
        ref_out = base + x @ delta_weight(M, d_in, d_out, comp).T
        gx_ref = torch.ones_like(x); gM_ref = delta_vjp_(g, x, M, comp, grad_x=gx_ref)
        c = lambda t: t.cuda()
        with torch.no_grad():
            out = add_delta_(c(base), c(x), c(M), comp).cpu()
        gx = c(torch.ones_like(x)); gM = delta_vjp_(c(g), c(x), c(M), comp, grad_x=gx).cpu()
        err = max((out - ref_out).abs().max().item(), (gx.cpu() - gx_ref).abs().max().item(), (gM - gM_ref).abs().max().item())
        worst = max(worst, err)
        print(comp, d_in, d_out, size, f"{err:.2e}")
print("worst", f"{worst:.2e}", "OK" if worst < 1e-9 else "MISMATCH")
