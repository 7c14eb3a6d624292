"""The GPT model: GPT-2's architecture, loadable from GPT-2 checkpoints.

Explained in the chapter "The GPT architecture" (chapters/04_gpt.ipynb). It holds the
configuration (``GPTConfig`` and its presets), the building blocks (``MLP``, ``Block``), the
model (``GPT``), the loader of Hugging Face GPT-2 weights (``GPT.from_hf_gpt2``) and a FLOP
estimate. Parameter names follow GPT-2's checkpoints (``transformer.h.0.attn.c_attn`` ...),
so loading them is a loop plus four transposes.

It does not train (``train.py``) nor sample (``generate.py``); ``GPT.forward`` accepts the
per-layer key/value caches that generation uses.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from llm_from_scratch.attention import KVCache, MultiHeadAttention
from llm_from_scratch.linear import Linear  # nn.Linear, its CPU products on oneDNN (chapter 5)
from llm_from_scratch.loss import cross_entropy

#: Index that ``GPT.forward`` ignores in ``targets`` (the cross-entropy default).
IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    """Sizes of a GPT. The defaults are GPT-2 small (124M parameters).

    ``vocab_size``: token ids are ``0 .. vocab_size - 1``. ``context_length``: most tokens
    the model sees at once (learned positions). ``d_model``: width of the residual stream.
    ``n_layers``: transformer blocks. ``n_heads``: attention heads per block (``d_model`` must
    be divisible by it). ``dropout``: on embeddings, attention weights and residual branches.
    ``bias``: biases in linear layers and layer norms (GPT-2: True). ``tie_weights``: the
    output layer reuses the token embedding matrix (GPT-2: True). ``use_sdpa``: PyTorch's fused
    attention instead of the explicit one. ``layer_norm_eps``: GPT-2 uses 1e-5.
    ``gelu_approximate``: ``"tanh"`` (GPT-2's ``gelu_new``) or ``"none"`` (exact GELU).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    use_sdpa: bool = True
    layer_norm_eps: float = 1e-5
    gelu_approximate: str = "tanh"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.gelu_approximate not in ("tanh", "none"):
            raise ValueError(f"GPTConfig.gelu_approximate must be 'tanh' or 'none', got {self.gelu_approximate!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # --- presets ---------------------------------------------------------------------------
    @classmethod
    def gpt2_small(cls, **overrides) -> GPTConfig:
        """GPT-2 small: 12 layers, 12 heads, d_model 768, 124,439,808 parameters (tied)."""
        return cls(**{**dict(n_layers=12, n_heads=12, d_model=768), **overrides})

    @classmethod
    def gpt2_medium(cls, **overrides) -> GPTConfig:
        """GPT-2 medium: 24 layers, 16 heads, d_model 1024, about 355M parameters."""
        return cls(**{**dict(n_layers=24, n_heads=16, d_model=1024), **overrides})

    @classmethod
    def gpt2_large(cls, **overrides) -> GPTConfig:
        """GPT-2 large: 36 layers, 20 heads, d_model 1280, about 774M parameters."""
        return cls(**{**dict(n_layers=36, n_heads=20, d_model=1280), **overrides})

    @classmethod
    def gpt2_xl(cls, **overrides) -> GPTConfig:
        """GPT-2 XL: 48 layers, 25 heads, d_model 1600, about 1.56B parameters."""
        return cls(**{**dict(n_layers=48, n_heads=25, d_model=1600), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> GPTConfig:
        """A CPU toy with GPT-2's vocabulary: 4 layers, 4 heads, d_model 128, context 128.

        About 7.2M parameters, 6.4M of them the (tied) token embedding.
        """
        return cls(**{**dict(n_layers=4, n_heads=4, d_model=128, context_length=128), **overrides})

    @classmethod
    def small_cpu(cls, **overrides) -> GPTConfig:
        """A model a laptop CPU trains in minutes: 6 layers, 6 heads, d_model 384, context 256.

        About 30M parameters, 19.3M of them the (tied) token embedding.
        """
        return cls(**{**dict(n_layers=6, n_heads=6, d_model=384, context_length=256), **overrides})

    @classmethod
    def presets(cls) -> dict[str, GPTConfig]:
        """Every preset by name."""
        names = ("gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl", "tiny", "small_cpu")
        return {name: getattr(cls, name)() for name in names}


class MLP(nn.Module):
    """The feed-forward block: ``d_model -> 4 d_model -> GELU -> d_model``, per token.

    Input and output ``(B, T, d_model)``. Names ``c_fc``/``c_proj`` as in GPT-2.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)  # GPT-2 uses the tanh approximation
        self.c_proj = Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, d_model)


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = MultiHeadAttention(
            config.d_model,
            config.n_heads,
            context_length=config.context_length,
            dropout=config.dropout,
            bias=config.bias,
            use_sdpa=config.use_sdpa,
        )
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, *, kv_cache: KVCache | None = None, padding_mask: Tensor | None = None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache=kv_cache, padding_mask=padding_mask)  # (B, T, d_model)
        x = x + self.mlp(self.ln_2(x))
        return x


def check_token_inputs(
    idx: Tensor, config, *, kv_cache: list[KVCache] | None = None, position_ids: Tensor | None = None
) -> int:
    """Validates a language model's inputs at its public boundary; returns the cache length.

    ``idx`` must be an integer ``(B, T)`` tensor with ``T >= 1`` and ids in ``[0, vocab_size)``;
    ``kv_cache`` one cache per layer; the cached plus new tokens must fit ``context_length``;
    ``position_ids``, when given, a ``(B, T)`` tensor. ``config`` needs ``vocab_size``,
    ``context_length`` and ``n_layers``. Shared by ``GPT`` and the Llama-style model.
    """
    if not isinstance(idx, Tensor):
        raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"idx must have shape (batch, tokens) with at least one token, got {tuple(idx.shape)}")
    B, T = idx.shape
    start = 0
    if kv_cache is not None:
        if len(kv_cache) != config.n_layers:
            raise ValueError(f"kv_cache must hold {config.n_layers} caches (one per layer), got {len(kv_cache)}")
        start = len(kv_cache[0])
    if start + T > config.context_length:
        raise ValueError(f"sequence of {start + T} tokens is longer than context_length={config.context_length}")
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size}), got values in [{low}, {high}]")
    if position_ids is not None and (not isinstance(position_ids, Tensor) or position_ids.shape != (B, T)):
        shape = tuple(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids must be a tensor of shape {(B, T)}, got {shape}")
    return start


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` ``(B, T, V)`` against ``targets`` ``(B, T)``, skipping ``-100``."""
    if not isinstance(targets, Tensor) or targets.shape != logits.shape[:2]:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a tensor of shape {tuple(logits.shape[:2])}, got {shape}")
    return cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)  # = F.cross_entropy, faster on CPU


class GPT(nn.Module):
    """GPT-2: token + position embeddings, ``n_layers`` blocks, a final layer norm, the output layer.

    ``forward(idx)`` maps token ids ``(B, T)`` to logits ``(B, T, vocab_size)``: row ``t`` scores
    every possible next token after ``idx[:, :t+1]``. See the chapter "The GPT architecture".
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),  # token embeddings
                wpe=nn.Embedding(config.context_length, config.d_model),  # learned positions
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
                ln_f=nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias),
            )
        )
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight  # one tensor, two uses
        self.apply(self._init_weights)
        # Each block adds two branches to the residual stream; scale their output projections so
        # that the stream's variance does not grow with depth (GPT-2 paper, section 2.3).
        residual_std = 0.02 / math.sqrt(2 * config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Number of parameters, a tied matrix counted once.

        ``exclude_embeddings=True`` leaves out the token and position embeddings (with tying,
        the output layer goes with them).
        """
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            total -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return total

    def new_kv_cache(self) -> list[KVCache]:
        """One empty ``KVCache`` per layer, for ``forward(..., kv_cache=...)``."""
        return [KVCache() for _ in range(self.config.n_layers)]

    def hidden(
        self,
        idx: Tensor,
        *,
        kv_cache: list[KVCache] | None = None,
        padding_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """The final layer norm's output ``(B, T, d_model)`` for token ids ``idx`` ``(B, T)``: ``forward``
        without the output layer. A loss on a few positions applies ``lm_head`` to those alone
        (the chapter "Following instructions"). The keyword arguments are ``forward``'s."""
        start = check_token_inputs(idx, self.config, kv_cache=kv_cache, position_ids=position_ids)
        B, T = idx.shape
        pos = torch.arange(start, start + T, device=idx.device) if position_ids is None else position_ids  # (T,) | (B, T)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, d_model)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache=None if kv_cache is None else kv_cache[i], padding_mask=padding_mask)
        return self.transformer.ln_f(x)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        kv_cache: list[KVCache] | None = None,
        padding_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits for token ids ``idx`` of shape ``(B, T)``.

        Returns ``logits`` of shape ``(B, T, vocab_size)`` when ``targets`` is None, else the
        pair ``(logits, loss)``: ``targets`` ``(B, T)`` holds the next token of every position,
        ``loss`` is the mean cross-entropy over the targets that are not ``-100``.

        ``kv_cache``: the list from ``new_kv_cache()``. ``idx`` then holds the tokens that follow
        the cached ones; positions start at the cache length, and the caches grow by ``T``.

        For a batch of prompts of different lengths, padded on the left (chapter "Generating
        text"): ``padding_mask`` ``(B, T_cache + T)`` bool, ``True`` for real tokens (no query
        attends to padding), and ``position_ids`` ``(B, T)``, the position of each token in its
        own sequence (default: ``T_cache .. T_cache + T - 1`` for every row).
        """
        x = self.hidden(idx, kv_cache=kv_cache, padding_mask=padding_mask, position_ids=position_ids)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is None:
            return logits
        return logits, next_token_loss(logits, targets)

    # --- GPT-2 checkpoints ------------------------------------------------------------------
    @classmethod
    def from_hf_gpt2(
        cls, state_dict_or_path: Mapping[str, Tensor] | str | Path, config: GPTConfig | None = None
    ) -> GPT:
        """A GPT holding Hugging Face GPT-2 weights.

        ``state_dict_or_path``: the state dict of a ``GPT2LMHeadModel`` or ``GPT2Model``, a
        ``.safetensors`` file, or a folder written by ``save_pretrained`` (``model.safetensors``
        and ``config.json``). ``config``: our configuration; when None it is read from the
        folder's ``config.json`` or inferred from the weights' shapes (the number of heads,
        which no shape shows, from GPT-2's presets). Raises ``ValueError`` listing missing,
        unexpected and mis-shaped keys. HF's ``Conv1D`` stores ``c_attn``, ``c_proj`` and ``c_fc``
        weights as ``(in, out)``; our ``nn.Linear`` wants ``(out, in)``, so they are transposed.
        """
        state_dict, hf_config = _read_hf_gpt2(state_dict_or_path)
        state_dict = {_strip_prefix(k): v for k, v in state_dict.items() if not _is_hf_buffer(k)}
        if config is None:
            config = _infer_config(state_dict, hf_config)
        model = cls(config)
        model.load_hf_gpt2_state_dict(state_dict)
        return model

    @torch.no_grad()
    def load_hf_gpt2_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Copy a Hugging Face GPT-2 state dict into this model (see ``from_hf_gpt2``)."""
        hf = {_strip_prefix(k): v for k, v in state_dict.items() if not _is_hf_buffer(k)}
        ours = self.state_dict()
        tied = self.config.tie_weights
        missing, mismatched = [], []
        for name, param in ours.items():
            if name == "lm_head.weight" and (tied or name not in hf):
                continue  # tied to wte, or a GPT2Model without a head: filled from wte below
            if name not in hf:
                missing.append(name)
                continue
            value = hf[name]
            if name.endswith(_TRANSPOSED):
                value = value.t()  # Conv1D (in, out) -> Linear (out, in)
            if value.shape != param.shape:
                expected = tuple(param.shape)[::-1] if name.endswith(_TRANSPOSED) else tuple(param.shape)
                layout = " (Conv1D layout: in, out)" if name.endswith(_TRANSPOSED) else ""
                mismatched.append(f"{name}: checkpoint {tuple(hf[name].shape)}, expected {expected}{layout}")
        unexpected = sorted(set(hf) - set(ours))
        if "lm_head.weight" in hf and "lm_head.weight" in unexpected:
            unexpected.remove("lm_head.weight")
        if "lm_head.weight" in hf and hf["lm_head.weight"].shape != ours["lm_head.weight"].shape:
            mismatched.append(f"lm_head.weight: checkpoint {tuple(hf['lm_head.weight'].shape)}, "
                              f"expected {tuple(ours['lm_head.weight'].shape)}")
        if missing or unexpected or mismatched:
            raise ValueError(
                "state dict does not fit this GPT:"
                + (f"\n  missing keys: {missing}" if missing else "")
                + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
                + (f"\n  mis-shaped keys: {mismatched}" if mismatched else "")
            )
        params = dict(self.named_parameters(remove_duplicate=False))
        for name, param in params.items():
            if name == "lm_head.weight" and (tied or name not in hf):
                continue
            value = hf[name].t() if name.endswith(_TRANSPOSED) else hf[name]
            param.copy_(value)
        if not tied and "lm_head.weight" not in hf:
            self.lm_head.weight.copy_(self.transformer.wte.weight)


_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT2_HEADS = {768: 12, 1024: 16, 1280: 20, 1600: 25}
_HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def _strip_prefix(key: str) -> str:
    # GPT2Model's keys lack the "transformer." prefix that GPT2LMHeadModel's carry.
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


def _is_hf_buffer(key: str) -> bool:
    # Older checkpoints store the causal mask as buffers "attn.bias" and "attn.masked_bias".
    return key.endswith((".attn.bias", ".attn.masked_bias"))


def _read_hf_gpt2(source: Mapping[str, Tensor] | str | Path) -> tuple[dict[str, Tensor], dict | None]:
    if isinstance(source, Mapping):
        return dict(source), None
    if not isinstance(source, (str, Path)):
        raise TypeError(f"expected a state dict, a .safetensors file or a folder, got {type(source).__name__}")
    from safetensors.torch import load_file

    path = Path(source)
    hf_config = None
    if path.is_dir():
        if (path / "config.json").is_file():
            hf_config = json.loads((path / "config.json").read_text())
        path = path / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"no safetensors file at {path}")
    return load_file(str(path)), hf_config


def _infer_config(state_dict: Mapping[str, Tensor], hf_config: dict | None) -> GPTConfig:
    if hf_config is not None:
        activation = hf_config.get("activation_function", "gelu_new")
        if activation not in _HF_GELU:
            raise ValueError(f"unsupported activation_function {activation!r}: expected one of {sorted(_HF_GELU)}")
        n_inner = hf_config.get("n_inner")
        if n_inner is not None and n_inner != 4 * hf_config["n_embd"]:
            raise ValueError(f"unsupported n_inner={n_inner}: this GPT's MLP has width 4 * n_embd")
        return GPTConfig(
            vocab_size=hf_config["vocab_size"],
            context_length=hf_config["n_positions"],
            d_model=hf_config["n_embd"],
            n_layers=hf_config["n_layer"],
            n_heads=hf_config["n_head"],
            layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
            tie_weights=hf_config.get("tie_word_embeddings", True),
            gelu_approximate=_HF_GELU[activation],
        )
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        if key not in state_dict:
            raise ValueError(f"cannot infer the configuration: missing key {key}; pass config=")
    vocab_size, d_model = state_dict["transformer.wte.weight"].shape
    context_length = state_dict["transformer.wpe.weight"].shape[0]
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if d_model not in _GPT2_HEADS:
        raise ValueError(f"cannot infer n_heads for d_model={d_model} (not a GPT-2 size); pass config=")
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=context_length,
        d_model=d_model,
        n_layers=max(layers) + 1 if layers else 0,
        n_heads=_GPT2_HEADS[d_model],
    )


def count_parameters(config: GPTConfig) -> int:
    """Parameters of ``GPT(config)`` by formula (the chapter derives it term by term)."""
    d, V, L, T = config.d_model, config.vocab_size, config.n_layers, config.context_length
    b = 1 if config.bias else 0
    ln = d + b * d  # weight and bias
    attn = d * 3 * d + b * 3 * d + d * d + b * d
    mlp = d * 4 * d + b * 4 * d + 4 * d * d + b * d
    block = 2 * ln + attn + mlp
    head = 0 if config.tie_weights else V * d
    return V * d + T * d + L * block + ln + head


def estimate_flops_per_token(config: GPTConfig, *, seq_len: int | None = None, training: bool = True) -> int:
    """FLOPs to process one token: about ``6 N + 12 L d T`` for training, a third for a forward pass.

    ``N`` counts the parameters that take part in matrix multiplications (everything but the
    position embeddings; the token embedding counts once, as the output layer). The second term
    is attention's ``q @ k^T`` and ``weights @ v`` over ``T = seq_len`` (default:
    ``context_length``) tokens. A forward pass is 2 FLOPs per multiply-add; the backward pass
    costs twice the forward (PaLM paper, appendix B).
    """
    T = config.context_length if seq_len is None else seq_len
    n = count_parameters(config) - config.context_length * config.d_model
    forward = 2 * n + 4 * config.n_layers * config.d_model * T
    return 3 * forward if training else forward

