"""Pure-PyTorch reference of the selective scan (mamba_ssm's ``selective_scan_fn`` for real A)."""
import torch
import torch.nn.functional as F

from ._common import acc_dtype


def _time_major(M, dim):
    """B or C as (L, batch, dim|1, N): grouped (batch, G, N, L) expands to every channel of its group,
    ungrouped (batch, N, L) broadcasts over channels. Time leads so that each step reads contiguous memory."""
    if M.dim() == 4:
        M = M.repeat_interleave(dim // M.shape[1], dim=1)
    else:
        M = M.unsqueeze(1)
    return M.permute(3, 0, 1, 2).contiguous()


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Returns ``(out, last_state)``: out ``(batch, dim, L)`` in u's dtype, last_state ``(batch, dim, N)``.

    For each (batch, channel) with state x in R^N, starting from zero, over positions t:
      dt = softplus(delta + delta_bias) (or without softplus), x = exp(dt * A) * x + dt * B_t * u_t,
      y_t = <C_t, x> + D * u_t, then out = y * silu(z) when z is given.
    """
    sdt = acc_dtype(u)  # float16/bfloat16/float32 inputs keep the state in float32
    batch, dim, L = u.shape
    n = A.shape[1]
    uf = u.to(sdt)
    dt = delta.to(sdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(sdt)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt_t = dt.permute(2, 0, 1).unsqueeze(-1)  # (L, batch, dim, 1)
    decay = torch.exp(dt_t * A.to(sdt))  # (L, batch, dim, N)
    drive = dt_t * uf.permute(2, 0, 1).unsqueeze(-1) * _time_major(B.to(sdt), dim)  # (L, batch, dim, N)
    Cx = _time_major(C.to(sdt), dim)
    x = uf.new_zeros(batch, dim, n)
    ys = []
    for t in range(L):
        x = decay[t] * x + drive[t]
        ys.append((x * Cx[t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else uf.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + uf * D.to(sdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(sdt))
    return y.to(u.dtype), x
