"""Optimal transport between word and region outputs, by IPOT (Xie et al. 2018), as UNITER's WRA.

The cost of matching word i with region j is their cosine distance. The transport plan T spreads
mass 1/m from every word over the regions so that every region receives 1/n, at least total cost;
the WRA distance is sum(C * T). The plan is found without gradient (UNITER), so the gradient flows
through the cost only: it pulls together the words and regions the plan matched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, m, C), (B, n, C) -> (B, m, n) cosine distance, 1 - cos, in [0, 2]."""
    return 1 - F.normalize(x, dim=-1, eps=1e-5) @ F.normalize(y, dim=-1, eps=1e-5).transpose(1, 2)


@torch.no_grad()
def ipot(cost: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor, beta: float = 0.5,
         iterations: int = 50, k: int = 1) -> torch.Tensor:
    """Transport plan (B, m, n) between the valid rows (B, m) and valid columns (B, n) of cost.

    Rows get mass 1/m each and columns 1/n each (m, n: the valid counts); invalid rows and columns
    get none (and so does a sample with no valid row or column). Each outer iteration is a proximal
    step towards the exact plan (beta: its step size), solved with k Sinkhorn updates."""
    usable = (x_valid.any(1) & y_valid.any(1)).unsqueeze(1)  # (B, 1) a side with nothing: no plan at all
    xv, yv = (x_valid & usable).to(cost.dtype), (y_valid & usable).to(cost.dtype)  # (B, m), (B, n)
    m = xv.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    n = yv.sum(1, keepdim=True).clamp(min=1)
    joint = xv.unsqueeze(2) * yv.unsqueeze(1)  # (B, m, n) 1 where both are valid
    A = torch.exp(-cost / beta) * joint
    T = joint.clone()
    b = yv / n  # (B, n) column scaling
    for _ in range(iterations):
        Q = A * T  # (B, m, n)
        for _ in range(k):
            a = xv / (m * (Q @ b.unsqueeze(2)).squeeze(2) + (1 - xv))  # row sums -> 1/m; 0 on padding
            b = yv / (n * (a.unsqueeze(1) @ Q).squeeze(1) + (1 - yv))  # column sums -> 1/n
        T = a.unsqueeze(2) * Q * b.unsqueeze(1)
    return T


def ot_distance(x: torch.Tensor, y: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor,
                beta: float = 0.5, iterations: int = 50) -> torch.Tensor:
    """(B,) transport cost between the valid vectors of x (B, m, C) and y (B, n, C), in float32."""
    cost = cosine_cost(x.float(), y.float())  # (B, m, n)
    plan = ipot(cost.detach(), x_valid, y_valid, beta, iterations)
    return (cost * plan).sum(dim=(1, 2))
