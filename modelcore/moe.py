"""DeepSeekMoE: routed experts chosen by a (group-limited) top-k gate, plus always-on shared experts.

Routing (`Gate`):
* V2: softmax scores; topk_method "greedy" or "group_limited_greedy" (group score = best expert of the group).
* V3: sigmoid scores; `e_score_correction_bias` added for *choosing* only; "noaux_tc" group score = sum of the
  group's top-2; weights are the unbiased scores of the chosen experts.
* optional renormalisation of the top-k weights (norm_topk_prob), then times routed_scaling_factor.

Dispatch (`MoE.forward`) runs only experts that received tokens: tokens are sorted by expert, gathered with
index_select, pushed through each hit expert as one matmul, weighted and index_add-ed back. `MoE.forward_loop`
is the naive per-token twin it is tested against. `MoE.pack()` additionally stacks the experts' weights (the
Linear weights become views into the stacks, so no extra memory) for two CUDA paths without host
synchronisation (CUDA-graph friendly): torch's grouped GEMM, and for a few tokens (decode) the Triton GEMV
kernels of modelcore/moe_kernels.py.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelcore.args import ModelArgs


class Expert(nn.Module):
    """One SwiGLU expert: down_proj(silu(gate_proj(x)) * up_proj(x)); plain Linears so quantization can swap them."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Router: (N, D) tokens -> top-k weights (N, k) and expert ids (N, k). Scores are computed in float32."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts = args.n_routed_experts
        self.top_k = args.n_activated_experts
        self.n_groups = max(1, args.n_expert_groups)
        self.n_limited_groups = max(1, args.n_limited_groups)
        self.score_func = args.score_func
        self.topk_method = args.topk_method
        self.norm_topk_prob = args.norm_topk_prob
        self.route_scale = args.route_scale
        assert self.score_func in ("softmax", "sigmoid"), f"unknown score_func {self.score_func!r}"
        assert self.topk_method in ("greedy", "group_limited_greedy", "noaux_tc"), f"unknown topk_method {self.topk_method!r}"
        assert self.n_experts % self.n_groups == 0, "n_routed_experts must be a multiple of n_group"
        assert 0 < self.top_k <= self.n_experts, "num_experts_per_tok must be in 1..n_routed_experts"
        self.weight = nn.Parameter(torch.empty(self.n_experts, args.dim))
        nn.init.normal_(self.weight, std=args.dim**-0.5)  # checkpoints overwrite it; never leave garbage routing
        bias = torch.zeros(self.n_experts) if self.score_func == "sigmoid" else None
        self.register_buffer("e_score_correction_bias", bias)  # V3 checkpoints carry it; V2 has none

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.topk_method != "greedy" and self.n_groups > 1:
            n = choice.shape[0]
            grouped = choice.view(n, self.n_groups, -1)  # (N, G, E/G)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            else:
                group_scores = grouped.amax(-1)  # (N, G)
            keep = group_scores.topk(self.n_limited_groups, dim=-1, sorted=False).indices  # (N, G_kept)
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(n, -1)  # (N, E)
        idx = choice.topk(self.top_k, dim=-1, sorted=False).indices  # (N, k), in no particular order
        weights = scores.gather(1, idx)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, idx


class MoE(nn.Module):
    """Routed experts (only those that got tokens run) + shared experts, on (B, T, D)."""

    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.dim = args.dim
        self.n_experts = args.n_routed_experts
        inter = args.moe_inter_dim or args.inter_dim
        self.gate = Gate(args)
        self.experts = nn.ModuleList([Expert(args.dim, inter) for _ in range(self.n_experts)])
        self.shared_experts = Expert(args.dim, inter * args.n_shared_experts) if args.n_shared_experts else None
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None  # (w13 (E, 2I, D), w2 (E, D, I)) after pack()
        self.shared_w13: torch.Tensor | None = None  # shared experts' [gate; up] (2I_s, D) after pack(): one matmul
        self.gemv: Callable | None = None  # Triton small-batch kernel (modelcore.moe_kernels), set by pack() on CUDA
        self.gemv_max_pairs = 16  # use it while tokens * top_k <= this; grouped GEMM above
        self.gemv_options: dict[str, int] = {}  # block sizes for moe_gemv (benchmarks/gpu_moe.py tunes them)
        self.routing = "dispatch"  # "dispatch" (routed experts only) | "loop" (forward_loop, the reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing == "loop":
            return self.forward_loop(x)
        shape = x.shape
        flat = x.reshape(-1, self.dim)  # (N, D)
        weights, idx = self.gate(flat)
        if self._grouped_ok(flat):
            if self.gemv is not None and idx.numel() <= self.gemv_max_pairs:
                routed = self.gemv(flat, idx, weights, *self.packed, **self.gemv_options)
            else:
                routed = self._dispatch_grouped(flat, weights, idx)
        else:
            routed = self._dispatch_sorted(flat, weights, idx)
        if self.shared_w13 is not None:
            gate, up = F.linear(flat, self.shared_w13).chunk(2, dim=-1)  # (N, I_s) each
            routed = routed + self.shared_experts.down_proj(F.silu(gate) * up)
        elif self.shared_experts is not None:
            routed = routed + self.shared_experts(flat)
        return routed.view(shape)

    def _dispatch_sorted(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sort (token, slot) pairs by expert; one matmul chain per expert that got tokens; index_add back."""
        k = idx.shape[1]
        expert_of = idx.reshape(-1)  # (N*k,)
        order = expert_of.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(expert_of, minlength=self.n_experts).tolist()  # one host sync per layer
        token_of = order // k  # (N*k,) source token of each sorted pair
        xs = flat.index_select(0, token_of)  # (N*k, D)
        ws = weights.reshape(-1).index_select(0, order)  # (N*k,)
        out = torch.zeros_like(flat)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            y = self.experts[e](xs[start:start + c]) * ws[start:start + c, None].to(flat.dtype)  # (c, D)
            out.index_add_(0, token_of[start:start + c], y)
            start += c
        return out

    def forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        """Naive twin: every token, every chosen expert, one at a time."""
        shape = x.shape
        flat = x.reshape(-1, self.dim)
        weights, idx = self.gate(flat)
        out = torch.zeros_like(flat)
        for n in range(flat.shape[0]):
            for j in range(idx.shape[1]):
                e = int(idx[n, j])
                out[n] += (self.experts[e](flat[n:n + 1]) * weights[n, j].to(flat.dtype))[0]
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)

    # --- grouped GEMM path (CUDA, bf16): no host sync, CUDA-graph friendly ---------------------------------
    def pack(self) -> bool:
        """Stack expert weights into (E, 2I, D) and (E, D, I) (and the shared experts' gate+up into one matrix);
        the Linears become views into the stacks. False if the experts are not plain Linears."""
        if not all(type(p) is nn.Linear for e in self.experts for p in (e.gate_proj, e.up_proj, e.down_proj)):
            return False  # quantized experts: keep the per-expert dispatch
        with torch.no_grad():
            w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])  # (E, 2I, D)
            w2 = torch.stack([e.down_proj.weight for e in self.experts])  # (E, D, I)
        inter = w2.shape[-1]
        for j, e in enumerate(self.experts):
            e.gate_proj.weight = nn.Parameter(w13[j, :inter], requires_grad=False)
            e.up_proj.weight = nn.Parameter(w13[j, inter:], requires_grad=False)
            e.down_proj.weight = nn.Parameter(w2[j], requires_grad=False)
        self.packed = (w13, w2)
        self.gemv = _load_gemv() if w13.is_cuda else None
        se = self.shared_experts
        if se is not None and type(se.gate_proj) is nn.Linear and type(se.up_proj) is nn.Linear:
            with torch.no_grad():
                self.shared_w13 = torch.cat([se.gate_proj.weight, se.up_proj.weight])  # (2I_s, D)
            half = self.shared_w13.shape[0] // 2
            se.gate_proj.weight = nn.Parameter(self.shared_w13[:half], requires_grad=False)
            se.up_proj.weight = nn.Parameter(self.shared_w13[half:], requires_grad=False)
        return True

    def _grouped_ok(self, flat: torch.Tensor) -> bool:
        return self.packed is not None and flat.is_cuda and flat.dtype == torch.bfloat16 and _grouped_mm() is not None

    def _dispatch_grouped(self, flat: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Same maths as _dispatch_sorted with grouped GEMMs over the packed stacks (offsets stay on device)."""
        w13, w2 = self.packed
        gmm = _grouped_mm()
        k = idx.shape[1]
        expert_of = idx.reshape(-1)  # (N*k,)
        order = expert_of.argsort(stable=True)
        counts = torch.zeros(self.n_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, expert_of, torch.ones_like(expert_of, dtype=torch.int32))  # bincount without a host sync
        offs = counts.cumsum(0, dtype=torch.int32)  # (E,) end of each expert's rows
        token_of = order // k
        xs = flat.index_select(0, token_of)  # (N*k, D)
        h = gmm(xs, w13.transpose(1, 2), offs=offs)  # (N*k, 2I)
        gate, up = h.chunk(2, dim=-1)
        y = gmm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)  # (N*k, D)
        y = y * weights.reshape(-1).index_select(0, order)[:, None].to(y.dtype)
        return torch.zeros_like(flat).index_add_(0, token_of, y)


def pack_experts(model: nn.Module) -> int:
    """Call MoE.pack() on every MoE layer of `model` (do it after loading, before CUDA decode); returns how many packed."""
    return sum(1 for m in model.modules() if isinstance(m, MoE) and m.packed is None and m.pack())


def _load_gemv() -> Callable | None:
    """modelcore.moe_kernels.moe_gemv when Triton is installed, else None."""
    try:
        from modelcore.moe_kernels import moe_gemv
    except ImportError:
        return None
    return moe_gemv


def _grouped_mm():
    """torch's grouped GEMM (public name first), or None on builds without it."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
