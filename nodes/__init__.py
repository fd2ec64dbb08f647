"""dagfusion's built-in node packs.

Each pack is a module with ``register_types``/``register_nodes`` hook implementations,
registered through the same plugin hooks as third-party packages. ``DAGFUSION_DISABLE_PLUGINS``
blocks a pack by its short name.
"""

BUILTIN_PLUGINS: dict[str, str] = {
    "basic": "dagfusion.nodes.basic",
    "tensor": "dagfusion.nodes.tensor",
    "io": "dagfusion.nodes.io",
    "diffusion": "dagfusion.nodes.diffusion",
    "shapes": "dagfusion.nodes.shapes",
    "metrics": "dagfusion.nodes.metrics",
    "training": "dagfusion.nodes.training",
    "cache": "dagfusion.nodes.cache",
    "quant": "dagfusion.nodes.quant",
    "lora": "dagfusion.nodes.lora",
    "everyday": "dagfusion.nodes.everyday",
    "rewards": "dagfusion.nodes.rewards",
    "textcraftor": "dagfusion.nodes.textcraftor",
    "structure": "dagfusion.nodes.structure",
    "video": "dagfusion.nodes.video",
    "tune": "dagfusion.nodes.tune",
}
"""Short name → module of every built-in pack, in registration order."""
