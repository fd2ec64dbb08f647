"""diffusers' own cache hooks as a dagfusion patch: First Block Cache, PAB, FasterCache, TaylorSeer, MagCache.

diffusers ships several training-free caches as *hooks* (``diffusers.hooks``): each
``apply_*(module, config)`` function wraps submodules of a denoiser so that they reuse or
extrapolate earlier results instead of computing. This module does not reimplement any of them;
:class:`DiffusersCachePatch` only runs them inside dagfusion's sampler:

- ``apply(module)`` calls the matching ``apply_*`` (``module.enable_cache(config)`` when the
  module is a ``CacheMixin``) and on exit removes every hook again (``disable_cache`` /
  ``HookRegistry.remove_hook``) and deletes what registering left on the modules (the
  ``_diffusers_hook`` registries and instance ``forward`` attributes), so the module is exactly
  as before the run;
- ``begin(run)`` resets the hooks' state (``HookRegistry.reset_stateful_hooks``) and returns a
  :class:`DiffusersCacheStep` that, around each denoiser call, records the current timestep
  (PAB and FasterCache read it through ``current_timestep_callback``) and sets the cache
  context the diffusers pipelines set: ``"cond_uncond"`` for a call carrying both
  classifier-free-guidance halves (dagfusion's sampler batches them in one call), ``"cond"``
  without guidance. ``CacheMixin`` models get ``module.cache_context(name)``; the others (the
  UNet, DiT and PixArt are not ``CacheMixin`` in diffusers 0.42) the same call it makes,
  ``diffusers.hooks.hooks._set_cache_context``.

Which method works on which denoiser (checked by :func:`unsupported_reasons`, found by running
each on the tiny UNet, DiT and PixArt models in diffusers 0.42.1):

============================  ======  ======  ======
method                        UNet    DiT     PixArt
============================  ======  ======  ======
first_block_cache             no      yes     yes
pyramid_attention_broadcast   yes     yes     yes
faster_cache                  no      no      yes (without 1024 px micro-conditions)
taylorseer                    yes     yes     yes
mag_cache                     no      yes     yes (needs magnitude ratios: MagCacheCalibrate)
============================  ======  ======  ======

First Block Cache and MagCache hook the top-level list of transformer blocks, which a UNet
does not have. FasterCache splits the guidance batch itself and assumes the unconditional
half first and every batched input among ``hidden_states``/``encoder_hidden_states``/
``timestep``/attention masks: the UNet gets a scalar timestep, DiT puts the conditional half
first and passes ``class_labels``, and PixArt at 1024 px passes resolution micro-conditions in
``added_cond_kwargs`` — FasterCache breaks on each. TaylorSeer's default module patterns match
no module of these models (they are written for Flux-style ``attn`` names), so the patch gives
it explicit ones: the attention and feed-forward modules of every transformer block
(:data:`TAYLORSEER_MODULES`), as in the TaylorSeer paper.

MagCache skips by model-specific magnitude ratios. diffusers has a ``calibrate=True`` mode that
measures them in one uncached run; the ``dagfusion.cache.MagCacheCalibrate`` node runs it and
outputs the ratios as text for the ``mag_ratios`` input.

Nodes: one per method — ``dagfusion.cache.FirstBlockCache``, ``PyramidAttentionBroadcast``,
``FasterCache``, ``TaylorSeer``, ``MagCache`` — each with only its method's inputs, all making the
one :class:`DiffusersCachePatch`; ``dagfusion.cache.MagCacheCalibrate``; and the deprecated
all-in-one ``dagfusion.cache.DiffusersCache``, which delegates to the method's node.

Modules: :mod:`~dagfusion.nodes.cache.diffusers_caches.support` (which method fits which
denoiser), :mod:`~dagfusion.nodes.cache.diffusers_caches.config` (settings, diffusers configs,
parsing), :mod:`~dagfusion.nodes.cache.diffusers_caches.patch` (the patch and its step hook),
:mod:`~dagfusion.nodes.cache.diffusers_caches.inputs` (the nodes' inputs and checks),
:mod:`~dagfusion.nodes.cache.diffusers_caches.nodes` and
:mod:`~dagfusion.nodes.cache.diffusers_caches.legacy` (the nodes).
"""

from __future__ import annotations

from dagfusion.nodes.cache.diffusers_caches import legacy, nodes
from dagfusion.nodes.cache.diffusers_caches.config import (
    CacheSettings,
    build_config,
    parse_floats,
    parse_mag_ratios,
    parse_timestep_range,
)
from dagfusion.nodes.cache.diffusers_caches.legacy import diffusers_cache
from dagfusion.nodes.cache.diffusers_caches.nodes import (
    METHOD_NODES,
    faster_cache,
    first_block_cache,
    mag_cache,
    mag_cache_calibrate,
    pyramid_attention_broadcast,
    taylorseer,
)
from dagfusion.nodes.cache.diffusers_caches.patch import (
    DiffusersCachePatch,
    DiffusersCacheStep,
    cache_context,
    calibrate_mag_ratios,
    hooked_modules,
)
from dagfusion.nodes.cache.diffusers_caches.support import (
    METHODS,
    TAYLORSEER_MODULES,
    check_supported,
    supported_methods,
    unsupported_reasons,
)

NODES = (*nodes.METHOD_NODES.values(), nodes.mag_cache_calibrate, *legacy.NODES)
"""The diffusers-cache nodes, in palette order (the deprecated one last)."""

__all__ = [
    "METHODS", "METHOD_NODES", "NODES", "TAYLORSEER_MODULES", "CacheSettings", "DiffusersCachePatch",
    "DiffusersCacheStep", "build_config", "cache_context", "calibrate_mag_ratios", "check_supported", "diffusers_cache",
    "faster_cache", "first_block_cache", "hooked_modules", "mag_cache", "mag_cache_calibrate", "parse_floats",
    "parse_mag_ratios", "parse_timestep_range", "pyramid_attention_broadcast", "supported_methods", "taylorseer",
    "unsupported_reasons",
]
