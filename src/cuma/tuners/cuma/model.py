"""CuMA tuner: injects CuMA layers, owns the profile projection and feeds ``profile_embeds`` to the layers."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._shared import RoutedTuner
from .config import CuMAConfig
from ...routing_state import CallHooks, RoutingScope, check_profile, checkpoint_layers_of, hand_over_profile
from .layer import CuMALayer, Linear

# projection groups that may share one router: they read the same input tensor inside one block
_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")


def build_profile_projection(config: CuMAConfig) -> Optional[nn.Module]:
    """The optional trainable projection of the frozen profile embedding (0, 1 or 2 layers)."""
    if config.profile_proj_layers == 0:
        return None
    out = config.profile_proj_dim or config.profile_dim
    if config.profile_proj_layers == 1:
        return nn.Sequential(nn.Linear(config.profile_dim, out))
    return nn.Sequential(nn.Linear(config.profile_dim, config.router_hidden), nn.GELU(), nn.Linear(config.router_hidden, out))


class ProfileStats(nn.Module):
    """The fitted statistics of one adapter's training profiles, as buffers saved with the adapter weights:
    ``center`` (profile_dim,), the mean training profile embedding (``router_profile_center='train'``), and ``basis``
    (k, profile_dim), the k leading principal directions of the centred training profiles
    (``router_profile_subspace=k``). Both are None until :func:`fit_profile_center` sets them (nothing is saved for an
    unfitted one). ``from_config`` marks values read from an old adapter's config, whose weights file lacks them."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", None)
        self.register_buffer("basis", None)
        self.from_config: set[str] = set()

    def set(self, name: str, value: Optional[torch.Tensor]) -> None:
        self._buffers[name] = None if value is None else value.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # an unfitted buffer is None (absent from the state dict): take the saved tensor's shape before the copy
        for name in ("center", "basis"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                current = self._buffers.get(name)
                if current is None or current.shape != saved.shape:
                    device = current.device if current is not None else saved.device
                    self._buffers[name] = torch.empty_like(saved, device=device)
                self.from_config.discard(name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in self.from_config:  # an old adapter: its fitted values came from adapter_config.json
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)


def profile_stats(model: nn.Module, adapter_name: str) -> Optional[ProfileStats]:
    """The :class:`ProfileStats` of ``adapter_name`` in a PeftModel or CuMAModel ``model`` (None if it has none)."""
    tuner = getattr(model, "base_model", model)
    stats = getattr(tuner, "cuma_profile_stats", None)
    return stats[adapter_name] if stats is not None and adapter_name in stats else None


def needs_profile_fit(model: nn.Module) -> list[str]:
    """The CuMA adapters of ``model`` that centre their routers' profile input (``router_profile_center='train'``)
    but have no fitted centre yet, or no basis where ``router_profile_subspace`` > 0 (an adapter loaded from a trained
    one keeps what was fitted then)."""
    out = []
    for name, config in (getattr(model, "peft_config", None) or {}).items():
        if not isinstance(config, CuMAConfig) or config.router_profile_center != "train":
            continue
        stats = profile_stats(model, name)
        if stats is None or stats.center is None or (config.router_profile_subspace > 0 and stats.basis is None):
            out.append(name)
    return out


def fit_profile_center(model: nn.Module, profile_embeds: torch.Tensor, adapter_name: Optional[str] = None) -> list[str]:
    """Set the ``center`` of every CuMA adapter of ``model`` with ``router_profile_center='train'`` (or only
    ``adapter_name``) to the mean of ``profile_embeds`` (the training profiles' embeddings, one row per profile), and,
    where ``router_profile_subspace`` is k > 0, its ``basis`` to the k leading principal directions of the centred rows
    (fewer where the rows span fewer). Both are buffers of the model (:class:`ProfileStats`), so ``save_pretrained``
    writes them to adapter_model.safetensors and a loaded adapter reads new profiles the same way. Returns the
    adapters it set."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ValueError("fit_profile_center needs a PeftModel with a CuMA adapter (got a model without peft_config)")
    if profile_embeds.ndim != 2 or profile_embeds.shape[0] == 0:
        raise ValueError(f"profile_embeds must be a non-empty (profiles, dim) tensor, got shape {tuple(profile_embeds.shape)}")
    rows = profile_embeds.detach().float()
    mean = rows.mean(0)
    if not torch.isfinite(mean).all():
        raise ValueError("profile_embeds contain NaN or infinite values: cannot fit profile_center")
    done = []
    directions = None  # the centred rows' principal directions, computed once for every adapter that reads them
    for name, config in configs.items():
        if adapter_name is not None and name != adapter_name:
            continue
        if not isinstance(config, CuMAConfig) or config.router_profile_center != "train":
            continue
        if mean.shape[0] != config.profile_dim:
            raise ValueError(
                f"CuMA adapter '{name}': profile_embeds have width {mean.shape[0]}, the adapter's profile_dim is "
                f"{config.profile_dim}"
            )
        stats = profile_stats(model, name)
        if stats is None:
            raise ValueError(f"CuMA adapter '{name}' has no profile statistics module: is it a CuMA PeftModel?")
        like = next((b for b in (stats.center, stats.basis) if b is not None), None)
        to = dict(device=like.device, dtype=like.dtype) if like is not None else dict(device=_device_of(model))
        stats.set("center", mean.to(**to))
        if config.router_profile_subspace > 0:
            if directions is None:
                directions = profile_subspace(rows.double() - rows.double().mean(0))
            basis = torch.tensor(directions[: config.router_profile_subspace], dtype=torch.float32)
            stats.set("basis", basis.to(**to))
        stats.from_config.clear()
        done.append(name)
    if adapter_name is not None and not done:
        raise ValueError(f"adapter '{adapter_name}' is not a CuMA adapter with router_profile_center='train'")
    return done


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None and first.device.type != "meta" else torch.device("cpu")


def profile_subspace(centred: torch.Tensor, k: Optional[int] = None) -> list[list[float]]:
    """The k (default: all) leading right singular vectors of the centred training profiles (rows of an orthonormal
    basis), without the directions they do not span (singular value below 1e-6 of the largest): a single profile
    gives none."""
    _, s, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    keep = int((s > 1e-6 * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    keep = keep if k is None else min(k, keep)
    if keep == 0:
        raise ValueError(
            "router_profile_subspace: the training profiles' embeddings span no direction around their mean (one "
            "distinct profile?): there is no subspace to fit"
        )
    return vh[:keep].float().tolist()


class CuMAModel(RoutedTuner):
    """Creates a CuMA model from a pretrained transformers model (see :class:`CuMAConfig`)."""

    prefix: str = "cuma_"
    tuner_layer_cls = CuMALayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default", **kwargs) -> None:
        # PeftModel hands the tuner a {name: config} dict; peft.inject_adapter_in_model hands it the bare config and
        # keeps only the model, which would lose a profile projection (it lives on the tuner): refuse that case the
        # way PEFT refuses tuners with shared state
        if isinstance(peft_config, CuMAConfig) and peft_config.profile_proj_layers > 0:
            raise ValueError(
                "`inject_adapter_in_model` does not support a CuMA adapter with profile_proj_layers > 0: its profile "
                "projection is shared state stored on the tuner. Please use `get_peft_model` instead."
            )
        super().__init__(model, peft_config, adapter_name, **kwargs)

    # ------------------------------------------------------------------------------------------------ injection
    def _pre_injection_hook(self, model: nn.Module, config: CuMAConfig, adapter_name: str) -> None:
        if not hasattr(self, "routing_scope"):
            self.cuma_profile_proj = nn.ModuleDict({})
            self.cuma_profile_stats = nn.ModuleDict({})
            self.routing_scope = RoutingScope("cuma", profile_proj=self.cuma_profile_proj)
            # the fitted profile statistics, read by the layers through the scope like the projections
            self.routing_scope.profile_stats = self.cuma_profile_stats
            hooks = CallHooks(self.routing_scope, profile_widths=self._active_profile_dims,
                              checkpoint_layers=checkpoint_layers_of(model))
            self._call_hook_handles = hooks.install(model)
            self._router_owners: dict[tuple, CuMALayer] = {}

    def _ensure_projection(self, config: CuMAConfig, adapter_name: str) -> None:
        if config.router_profile_center == "train" and adapter_name not in self.cuma_profile_stats:
            stats = ProfileStats()
            # an adapter saved before the fitted tensors were buffers: take them from its config, once
            for name, values in (("center", config.profile_center), ("basis", config.profile_basis)):
                if values is not None:
                    stats.set(name, torch.tensor(values, dtype=torch.float32, device=_device_of(self.model)))
                    stats.from_config.add(name)
            config.profile_center = config.profile_basis = None
            self.cuma_profile_stats[adapter_name] = stats
        if adapter_name in self.cuma_profile_proj:
            return
        proj = build_profile_projection(config)
        if proj is not None:
            first = next(self.model.parameters(), None)
            # built like PEFT builds adapter layers: in the base model's dtype (_cast_adapter_dtype upcasts it), and
            # left on the meta device under low_cpu_mem_usage (the loaded weights are assigned later)
            if first is not None and first.device.type != "meta" and not any(p.is_meta for p in proj.parameters()):
                proj = proj.to(device=first.device, dtype=first.dtype if first.is_floating_point() else None)
            self.cuma_profile_proj[adapter_name] = proj

    def _router_group(self, config: CuMAConfig, key: str) -> Optional[tuple[str, str]]:
        parent, _, leaf = key.rpartition(".")
        if config.share_router_qkv and leaf in _QKV:
            return parent, "qkv"
        if config.share_router_gate_up and leaf in _GATE_UP:
            return parent, "gate_up"
        return None

    def _create_and_replace(
        self,
        config: CuMAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        self._ensure_projection(config, adapter_name)
        group = self._router_group(config, current_key)
        owner = None
        if group is not None:
            owner = self._router_owners.get((adapter_name, *group))
        if isinstance(target, CuMALayer):
            target.update_layer(adapter_name, config, router_owner=owner)
            new_module = target
        else:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"CuMA can adapt torch.nn.Linear modules only; '{current_key}' is {type(base).__name__}"
                )
            new_module = Linear(target, adapter_name, config, self.routing_scope, router_owner=owner)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
        if group is not None and owner is None:
            self._router_owners[(adapter_name, *group)] = new_module

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        proj = self.cuma_profile_proj[adapter_name] if adapter_name in self.cuma_profile_proj else None
        if autocast_adapter_dtype and proj is not None:  # PEFT's rule for adapter weights: fp16/bf16 -> fp32
            for p in proj.parameters():
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for name, proj in self.cuma_profile_proj.items():
            frozen = getattr(self.peft_config.get(name), "inference_mode", False)
            proj.requires_grad_(name in self.active_adapters and not frozen)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # PEFT freezes an inference-mode adapter's parameters inside the base model; the profile projection lives on
        # the tuner, so a frozen load (is_trainable=False) freezes it here
        if self.peft_config[adapter_name].inference_mode and adapter_name in self.cuma_profile_proj:
            self.cuma_profile_proj[adapter_name].requires_grad_(False)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # PEFT maps checkpoint keys to the model's state-dict keys, which hold no unfitted (None) buffer: put the
        # adapter name into the fitted statistics' keys here
        out = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        stat = re.compile(r"((?:^|\.)cuma_profile_stats)\.(center|basis)$")
        return {stat.sub(rf"\1.{adapter_name}.\2", k): v for k, v in out.items()}

    # -------------------------------------------------------------------------------------------- adapters
    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, proj in self.cuma_profile_proj.items():
            proj.requires_grad_(name in names and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.cuma_profile_proj:
            del self.cuma_profile_proj[adapter_name]
        if adapter_name in self.cuma_profile_stats:
            del self.cuma_profile_stats[adapter_name]
        for key in [k for k in self._router_owners if k[0] == adapter_name]:
            del self._router_owners[key]

    def _check_merge_allowed(self):
        raise ValueError(
            "CuMA adapters cannot be merged: the experts are mixed per token by a profile-aware router, so there is "
            "no single weight update to fold into the base model. Keep the adapter unmerged."
        )

    # ----------------------------------------------------------------------------------------------- forward
    def _active_profile_dims(self) -> dict[str, int]:
        return {
            name: self.peft_config[name].profile_dim
            for name in self.active_adapters
            if name in self.peft_config and self.peft_config[name].profile_dim > 0
        }

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Receives ``profile_embeds`` from ``PeftModel.forward``/``generate`` and hands it to the base-model calls
        made inside (one :class:`cuma.routing_state.RoutingCall` each). Nothing outlives the PeftModel call."""
        e = kwargs.get("profile_embeds")
        if e is not None:
            check_profile(e, self._active_profile_dims())
            e = e.to(next(self.model.parameters()).device)
        with hand_over_profile(self.routing_scope, e):
            yield
