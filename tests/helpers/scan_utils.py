"""An independent float64 statement of the selective scan, shared by the scan tests."""
import torch


def scan_loop_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Scalar-state statement of the scan: one (batch, channel, state) triple at a time, in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, L = u.shape
    n = A.shape[1]
    out = torch.zeros(batch, dim, L, dtype=torch.float64)
    last = torch.zeros(batch, dim, n, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            g = d // (dim // B.shape[1]) if B.dim() == 4 else None
            h = torch.zeros(n, dtype=torch.float64)
            for t in range(L):
                dt = delta[b, d, t] + (delta_bias[d].double() if delta_bias is not None else 0.0)
                if delta_softplus:
                    dt = torch.log1p(torch.exp(dt)) if dt < 20 else dt
                Bt = B[b, g, :, t] if g is not None else B[b, :, t]
                Ct = C[b, g, :, t] if C.dim() == 4 else C[b, :, t]
                h = torch.exp(dt * A[d]) * h + dt * Bt * u[b, d, t]
                y = (h * Ct).sum()
                if D is not None:
                    y = y + D[d].double() * u[b, d, t]
                if z is not None:
                    zz = z[b, d, t].double()
                    y = y * zz * torch.sigmoid(zz)
                out[b, d, t] = y
            last[b, d] = h
    return out, last
