"""The handle of a latent structural diffusion model (``STRUCTURAL_MODEL``).

Importing this module imports no torch: the socket type names the class here, and the engine
checks values against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dagfusion.model import ModelHandle, StaticRef, class_names, unwrap_compiled


class StructuralHandle(ModelHandle):
    """A :class:`StructuralUNet` with its scheduler and patches: a ``MODEL`` handle (so the shared
    sampler and the Train node drive it) that also says what the stacked channels mean.

    Attributes:
        targets: The targets, in channel order.
        latent_channels: Channels of one target's latent.
        layout_channels: Channels of the layout raster (0: none).
    """

    def __init__(self, ref: Any, *, scheduler: Any = None, patches: Sequence[Any] = (),
                 info: Mapping[str, Any] | None = None, offload: bool = False) -> None:
        super().__init__(ref, scheduler=scheduler, patches=patches, info=info, offload=offload)
        module = unwrap_compiled(self.denoiser)
        if "StructuralUNet" not in class_names(module):
            raise TypeError(f"a structural handle needs a StructuralUNet, got {type(module).__name__}")
        self.targets: tuple[str, ...] = module.targets
        self.latent_channels: int = module.latent_channels
        self.layout_channels: int = module.layout_channels

    @classmethod
    def wrap(cls, module: Any, *, fingerprint: str | None, scheduler: Any = None,
             info: Mapping[str, Any] | None = None, vae_scale_factor: int = 8, offload: bool = False) -> StructuralHandle:
        """A handle over ``module`` whose weights are identified by ``fingerprint`` (``None``: by content);
        ``offload``: the weights stay where they are and move to ``info["device"]`` only while used."""
        base: dict[str, Any] = {"source": f"in-memory {type(module).__name__}", "vae_scale_factor": vae_scale_factor}
        param = next(module.parameters())
        base.update(device=str(param.device), dtype=str(param.dtype).replace("torch.", ""))
        base.update(info or {})
        return cls(StaticRef(module, fingerprint), scheduler=scheduler, info=base, offload=offload)

    @classmethod
    def from_model(cls, model: ModelHandle) -> StructuralHandle:
        """The same weights, scheduler, patches and info, as a structural handle.

        :raises TypeError: the model's denoiser is not a :class:`StructuralUNet`.
        """
        if isinstance(model, StructuralHandle):
            return model
        return cls(model.ref, scheduler=model.scheduler, patches=model.patches, info=model.info, offload=model.offload)

    def as_model(self) -> ModelHandle:
        """A plain :class:`~dagfusion.model.ModelHandle` over the same weights (no copy)."""
        return ModelHandle(self.ref, scheduler=self.scheduler, patches=self.patches, info=self.info, offload=self.offload)

    @property
    def module(self) -> Any:
        return unwrap_compiled(self.denoiser)  # type: ignore[no-any-return]

    def __dagfusion_fingerprint__(self) -> str:
        from dagfusion.fingerprint import fingerprint

        return str(fingerprint({
            "structural": super().__dagfusion_fingerprint__(), "targets": list(self.targets),
            "latent_channels": self.latent_channels, "layout_channels": self.layout_channels,
        }))

    def __repr__(self) -> str:
        return f"StructuralHandle({self.info.get('source', '?')!r}, targets={list(self.targets)}, layout={self.layout_channels})"
