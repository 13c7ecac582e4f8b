"""Per-call routing state: what one call of a routed model hands its adapted layers, and nothing longer-lived.

Every call of the base model (a PeftModel forward, each step of ``generate``, a direct ``get_base_model()(...)``
call) opens its own :class:`RoutingCall`: the profile rows of exactly the batch that call runs on, its 2-D padding
mask, whether it records balance terms, and the terms it recorded. The call lives in a :class:`contextvars.ContextVar`
(one value per thread and per asyncio task) from the base model's forward pre-hook to its forward hook; nothing of it
stays on the model, so the next call, another thread or a disabled-adapter pass cannot read it.

How a profile travels::

    PeftModel.forward / generate(profile_embeds=e)
      -> CuMAModel._enable_peft_forward_hooks: hand_over_profile(scope, e)    (for the duration of that PeftModel call)
      -> base-model forward pre-hook (CallHooks.open): a RoutingCall carrying e (whatever the base model's inputs
         are called: input_ids, inputs_embeds, pixel_values, X, ...)
      -> adapted layers: scope.current().profile_for(rows of the layer's own input) -> e's rows for that batch
         (generation repeats each row for beams / returned sequences; anything else must match row for row), mask;
         call.record(term)
      -> base-model forward hook (CallHooks.finish): the finished call's terms go to this context's buffer
         always-called hook (CallHooks.close): the call ends, also when the forward raised (its terms are dropped)
    pop_balance_loss(model) -> takes this context's finished terms of the model's scopes.

Gradient checkpointing: the backward recompute of a checkpointed decoder layer runs after its forward returned. The
checkpoint function of every ``GradientCheckpointingLayer`` is wrapped (:func:`call_aware_checkpoint`) so that the
recompute runs inside a copy of the calls that were active when the layer first ran; the copy records no balance
term and no gates (they were recorded once, in the forward). This works for both ``use_reentrant`` modes; in the
reentrant one the first pass runs under ``no_grad``, so routed layers compute their balance term under
``torch.enable_grad()`` there (its graph reaches the router weights).
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

PROFILE_KWARG = "profile_embeds"

_EMPTY: Mapping = MappingProxyType({})
# scope -> the call of that scope now running in this context
_ACTIVE: ContextVar[Mapping["RoutingScope", "RoutingCall"]] = ContextVar("cuma_routing_calls", default=_EMPTY)
# scope -> (profile_embeds, generating, derived) handed over by a PeftModel call for its base-model calls; ``derived``
# holds values computed from that profile which every base-model call of the PeftModel call may reuse (the routers'
# profile parts across the decode steps of one generate); it dies with the PeftModel call
_HANDOFF: ContextVar[Mapping["RoutingScope", tuple]] = ContextVar("cuma_profile_handoff", default=_EMPTY)
# inside PeftModel.generate: the base model's rows are the caller's rows repeated in place (beams, sequences)
_GENERATING: ContextVar[bool] = ContextVar("cuma_generating", default=False)
# scope -> balance terms of finished calls, waiting for pop_balance_loss (one dict per context)
_FINISHED: ContextVar[Optional[dict]] = ContextVar("cuma_finished_terms", default=None)


class RoutingScope:
    """The key under which the calls of one tuner live, plus that tuner's fixed routing parts (the profile
    projections and fitted profile statistics of CuMA). One per tuner instance; ``copy.deepcopy`` of the model gives
    the copy its own scope. Holds no per-call data."""

    def __init__(self, kind: str, profile_proj: Optional[nn.ModuleDict] = None) -> None:
        self.kind = kind
        self.profile_proj = profile_proj  # owned (and registered) by the tuner, referenced here
        # the fitted profile statistics (centre, basis) per adapter: an nn.ModuleDict of buffers owned by the CuMA
        # tuner (saved with the adapter weights), referenced here so each routed layer reads them; None: none fitted
        self.profile_stats: Optional[nn.ModuleDict] = None

    def current(self) -> Optional["RoutingCall"]:
        """The call of this scope running in this context, or None outside any call."""
        return _ACTIVE.get().get(self)

    @contextmanager
    def call(
        self,
        profile_rows: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
        records_balance: bool = True,
    ) -> Iterator["RoutingCall"]:
        """Run adapted layers outside a base model (a layer on its own, in tests and benchmarks)::

            with scope.call(profile_rows=e):
                y = layer(x)

        On a clean exit the recorded balance terms wait for :func:`take_finished` like a model call's."""
        call = RoutingCall(profile_rows=profile_rows, token_mask=token_mask, records_balance=records_balance,
                           profile=profile_rows)
        token = _push(self, call)
        try:
            yield call
        except BaseException:
            _ACTIVE.reset(token)
            raise
        _ACTIVE.reset(token)
        _finish(self, call)

    def __repr__(self) -> str:
        return f"RoutingScope({self.kind!r})"


@dataclass(eq=False)
class RoutingCall:
    """The routing inputs and outputs of one call. ``profile_rows``: one profile row per batch row of this call;
    ``token_mask``: its 2-D attention mask (1 = real token); ``records_balance``: a training forward with gradients."""

    profile_rows: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None
    records_balance: bool = False
    recompute: bool = False
    # the profile as the caller handed it over (one row per prompt) and whether the call is a generation step (its
    # batch repeats each prompt's row in place); ``profile_rows`` becomes the rows matched to the batch the layers see
    profile: Optional[torch.Tensor] = None
    generating: bool = False
    # (rows, device) -> the profile rows of a batch of that many rows on that device: matched once per call, not in
    # every layer
    matched_rows: dict = field(default_factory=dict)
    # values derived from the profile that every routed layer of this call reuses (each router's profile part, the
    # normalised profile): key -> tensor, filled only by calls without gradients. It belongs to the PeftModel call
    # that handed the profile over (the base-model calls of one generate share it: the profile is the same in every
    # decode step) or, for a direct base-model call, to that call; it dies with it. A checkpoint recompute starts empty.
    derived: dict = field(default_factory=dict)
    balance_terms: list = field(default_factory=list)
    # per-call statistics that become one term when the call ends (MixLoRA's Mixtral term over all layers)
    accumulators: dict = field(default_factory=dict)
    # router sharing (q/k/v of one block): owner key -> (input tensor, gates) of this call only
    shared_gates: dict = field(default_factory=dict)
    module_id: Optional[int] = None
    token: Any = None

    @property
    def records(self) -> bool:
        """Whether layers record balance terms in this call (a training forward, not its checkpoint recompute)."""
        return self.records_balance and not self.recompute

    @property
    def computes_balance(self) -> bool:
        """Whether layers compute balance terms: a training forward and its checkpoint recompute (which must save
        the same tensors as the forward; its terms are thrown away)."""
        return self.records_balance

    def record(self, term: torch.Tensor) -> None:
        if self.records:
            self.balance_terms.append(term)

    def accumulator(self, key: Any, factory: Callable[[], Any]) -> Any:
        """The per-call accumulator ``key`` (created by ``factory``); it must have ``term() -> Tensor | None``.
        A recompute's accumulators are never read."""
        acc = self.accumulators.get(key)
        if acc is None:
            acc = self.accumulators[key] = factory()
        return acc

    def terms(self) -> list:
        if not self.records:
            return []
        out = list(self.balance_terms)
        for acc in self.accumulators.values():
            term = acc.term()
            if term is not None:
                out.append(term)
        return out

    def for_recompute(self) -> "RoutingCall":
        """The same inputs for a gradient-checkpointing recompute: records nothing, shares no cache."""
        return RoutingCall(profile_rows=self.profile_rows, token_mask=self.token_mask,
                           records_balance=self.records_balance, recompute=True, profile=self.profile,
                           generating=self.generating)

    def profile_for(self, rows: int, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
        """This call's profile rows for a layer input whose leading dimension (its batch) is ``rows``: the handed-over
        profile as given when the counts match, each row repeated in place during generation (beams, returned
        sequences); anything else raises. The layer knows its batch from its own input, so the call never guesses it
        from the base model's argument names. Matched once per (rows, device) for the whole call."""
        source = self.profile if self.profile is not None else self.profile_rows
        if source is None:
            return None
        key = (rows, device)
        hit = self.matched_rows.get(key)
        if hit is None:
            hit = expand_profile(source, rows, self.generating)
            if device is not None:
                hit = hit.to(device)
            self.matched_rows[key] = hit
        self.profile_rows = hit
        return hit

    def mask_for(self, rows: int, length: int) -> Optional[torch.Tensor]:
        """Boolean (rows, length) mask of this call's last ``length`` positions, or None when it does not fit."""
        mask = self.token_mask
        if mask is None or mask.shape[0] != rows or mask.shape[1] < length:
            return None
        return mask[:, -length:].bool()


def _push(scope: RoutingScope, call: RoutingCall):
    active = dict(_ACTIVE.get())
    active[scope] = call
    return _ACTIVE.set(MappingProxyType(active))


def _finish(scope: RoutingScope, call: RoutingCall) -> None:
    terms = call.terms() if call.records else []
    if not terms:
        return
    store = _FINISHED.get()
    if store is None:
        store = {}
        _FINISHED.set(store)
    store.setdefault(scope, []).extend(terms)


def take_finished(scopes) -> list:
    """Remove and return the balance terms that finished calls of ``scopes`` left in this context."""
    store = _FINISHED.get()
    if not store:
        return []
    out = []
    for scope in scopes:
        out.extend(store.pop(scope, ()))
    return out


# ------------------------------------------------------------------------------------------------ profile hand-over


@contextmanager
def hand_over_profile(scope: RoutingScope, profile: Optional[torch.Tensor]) -> Iterator[None]:
    """Make ``profile`` (or explicitly no profile) the profile of the base-model calls of ``scope`` made inside."""
    handoff = dict(_HANDOFF.get())
    handoff[scope] = (profile, _GENERATING.get(), {})
    token = _HANDOFF.set(MappingProxyType(handoff))
    try:
        yield
    finally:
        _HANDOFF.reset(token)


@contextmanager
def generation() -> Iterator[None]:
    """Marks a ``generate`` call: its base-model batches repeat each caller row in place (beams, sequences)."""
    token = _GENERATING.set(True)
    try:
        yield
    finally:
        _GENERATING.reset(token)


def expand_profile(profile: Optional[torch.Tensor], rows: int, generating: bool) -> Optional[torch.Tensor]:
    """Profile rows for a batch of ``rows``: as given when the counts match; during generation each row repeated
    in place (transformers expands inputs with ``repeat_interleave`` for beams and returned sequences)."""
    if profile is None:
        return None
    n = profile.shape[0]
    if n == rows:
        return profile
    if generating and n > 0 and rows % n == 0:
        return profile.repeat_interleave(rows // n, dim=0)
    hint = (
        " (generate repeats each row for beams / returned sequences; pass one row per prompt)"
        if generating
        else "; a batch that concatenates several parts (DPO's chosen + rejected) needs the rows for every part"
    )
    raise ValueError(f"profile_embeds has {n} rows but the batch has {rows}: give one profile row per example{hint}")


# ------------------------------------------------------------------------------------------------ base-model hooks


def check_profile(profile: Any, widths: Mapping[str, int]) -> None:
    """``profile_embeds`` must be a 2-D float tensor whose width is every active profile-routed adapter's."""
    if not isinstance(profile, torch.Tensor) or profile.dim() != 2:
        shape = tuple(profile.shape) if isinstance(profile, torch.Tensor) else type(profile).__name__
        raise ValueError(f"profile_embeds must be a 2-D tensor (batch, profile_dim), got {shape}")
    if not profile.is_floating_point():
        raise ValueError(f"profile_embeds must be a floating-point tensor, got {profile.dtype}")
    for name, dim in widths.items():
        if profile.shape[-1] != dim:
            raise ValueError(
                f"profile_embeds has width {profile.shape[-1]} but adapter '{name}' was built with profile_dim={dim}; "
                "encode profiles with the encoder the adapter was trained with"
            )


class CallHooks:
    """The three forward hooks that give every base-model call its own :class:`RoutingCall`. A callable-object set
    (not closures) so that ``copy.deepcopy`` of the model (TRL's reference models) gives the copy its own scope.

    ``profile_widths``: callable returning {adapter: profile_dim} of the active profile-routed adapters (CuMA), or
    None for tuners that never route on a profile."""

    def __init__(self, scope: RoutingScope, profile_widths: Optional[Callable[[], Mapping[str, int]]] = None,
                 checkpoint_layers: Optional[list] = None) -> None:
        self.scope = scope
        self.profile_widths = profile_widths
        self.checkpoint_layers = list(checkpoint_layers or [])

    def install(self, model: nn.Module) -> list:
        return [
            model.register_forward_pre_hook(self.open, with_kwargs=True),
            model.register_forward_hook(self.finish),
            model.register_forward_hook(self.close, always_call=True),
        ]

    def open(self, module: nn.Module, args: tuple, kwargs: dict):
        call = RoutingCall(module_id=id(module))
        call.token = _push(self.scope, call)  # first, so that close() always has this call to end
        changed = None
        profile = None
        if PROFILE_KWARG in kwargs:  # a direct base-model call may carry its own profile
            changed = dict(kwargs)
            profile = changed.pop(PROFILE_KWARG)
            generating = False
            if profile is not None:
                if self.profile_widths is None:
                    raise ValueError(f"this {self.scope.kind} adapter does not route on a profile: drop profile_embeds")
                check_profile(profile, self.profile_widths())
        else:
            profile, generating, derived = _HANDOFF.get().get(self.scope, (None, False, None))
            if derived is not None:
                call.derived = derived  # shared by the base-model calls of one PeftModel call (one generate)
        # the rows are matched to the batch by the routed layers (RoutingCall.profile_for), from their own input
        call.profile = profile
        call.generating = generating
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        call.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        call.records_balance = module.training and torch.is_grad_enabled()
        for layer in self.checkpoint_layers:
            if getattr(layer, "gradient_checkpointing", False):
                fn = getattr(layer, "_gradient_checkpointing_func", None)
                if fn is not None and not getattr(fn, "_cuma_call_aware", False):
                    if self.scope.kind in ("cuma", "mixlora") and getattr(fn, "keywords", {}).get("use_reentrant"):
                        warnings.warn(
                            "reentrant gradient checkpointing: the routers' balance term reaches each router's "
                            "weights but not the layers below it (the first pass runs without a graph); pass "
                            "gradient_checkpointing_kwargs={'use_reentrant': False} for exact gradients",
                            stacklevel=2,
                        )
                    layer._gradient_checkpointing_func = call_aware_checkpoint(fn)
        return (args, changed) if changed is not None else None

    def finish(self, module: nn.Module, args: tuple, output):
        call = self.scope.current()
        if call is not None and call.module_id == id(module):
            _finish(self.scope, call)
        return None

    def close(self, module: nn.Module, args: tuple, output):
        call = self.scope.current()
        if call is not None and call.module_id == id(module) and call.token is not None:
            token, call.token = call.token, None
            _ACTIVE.reset(token)
        return None


def checkpoint_layers_of(model: nn.Module) -> list:
    """The submodules whose forward transformers checkpoints (``GradientCheckpointingLayer``)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers >= 4.52 has it
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def call_aware_checkpoint(checkpoint_fn: Callable) -> Callable:
    """Wrap a layer's checkpoint function so that its recompute sees the calls active when the layer first ran."""

    @functools.wraps(checkpoint_fn)
    def checkpointed(function, *args, **kwargs):
        calls = _ACTIVE.get()
        if not calls:
            return checkpoint_fn(function, *args, **kwargs)
        first = True

        def run(*a, **k):
            nonlocal first
            if first:  # the forward pass itself
                first = False
                return function(*a, **k)
            token = _ACTIVE.set(MappingProxyType({s: c.for_recompute() for s, c in calls.items()}))
            try:
                return function(*a, **k)
            finally:
                _ACTIVE.reset(token)

        return checkpoint_fn(run, *args, **kwargs)

    checkpointed._cuma_call_aware = True
    return checkpointed
