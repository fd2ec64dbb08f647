"""The "solid" render style of the shapes world: shaded 3-D primitives with depth, normals and
occlusion (torch, CPU, vectorised).

Every shape of the world becomes a solid seen slightly from above and turned a little:

============  ==================================================================================
shape         solid
============  ==================================================================================
circle        a sphere
square        a cube, turned about its vertical axis and tilted towards the viewer (three faces show)
triangle      a cone standing on its base, apex up, tilted towards the viewer
cross         an extruded cross (a plus-shaped slab: the union of two boxes), turned and tilted
============  ==================================================================================

The camera is orthographic and looks down the camera's ``-z`` axis (camera space: ``x`` to the
right, ``y`` up, ``z`` towards the viewer — the ``NORMAL`` convention of
:mod:`dagfusion.nodes.structure.types`). Units are image sides: the image spans ``[0, 1]``
horizontally and vertically, the background is the plane ``z = 0`` and the camera sits at
``z = CAMERA_DISTANCE``. Each pixel's ray is cast analytically against every object (ray/sphere,
ray/box slabs, ray/cone quadric plus base disk) on the 4× supersampled grid; **the nearest hit
wins** (occlusion), and image, normals, depth and masks are averaged down.

- ``image``: the object's colour times Lambertian shading ``AMBIENT + DIFFUSE * max(0, n·L)``
  with the fixed light :data:`LIGHT` (from the upper left, in front), clamped to ``[0, 1]``;
  colours stay recognisable (lit faces are near the world's colour, the darkest faces keep
  :data:`AMBIENT` of it). The background is the world's flat background colour.
- ``depth``: distance from the camera along the ray divided by ``CAMERA_DISTANCE``
  ("larger is farther", background exactly 1.0, like the flat style);
  :func:`dagfusion.nodes.structure.maps.depth_from_distance` converts it to the ``DEPTH``
  convention (1 = nearest) — with ``near = SOLID_NEAR``, ``far = 1``.
- ``normal``: unit surface normals in camera space, background ``(0, 0, 1)``.
- ``mask``: per object, the fraction of the pixel where that object is the visible (nearest)
  surface — occluded parts are not in an object's mask.
- ``layout``: per object the box of its whole projected footprint (occluded parts included),
  the label ("red circle"), attributes (colour, shape, position, size) and the depth order
  (0 = nearest, by the distance of the object's centre).

Objects stand at different heights above the background, so in two-object scenes their depths
differ: without jitter the second object of the caption is nearer; with jitter a seeded coin
decides which. Jitter (centre, radius, in-plane rotation, turn, tilt and height) comes from the
sample's own generator, so a ``(seed, index)`` always gives the same pixels.
"""

from __future__ import annotations

import math

import torch

from dagfusion.nodes.shapes.world import BACKGROUNDS, COLOURS, POSITIONS, SIZES, Scene, ShapeObject

CAMERA_DISTANCE = 2.0
"""Distance from the camera to the background plane, in image sides."""
SOLID_NEAR = 0.5
"""Normalised distance (``distance / CAMERA_DISTANCE``) nothing in a solid render comes closer than."""
LIGHT = (-0.35, 0.55, 0.76)
"""Direction towards the light (camera space, normalised when used)."""
AMBIENT = 0.45
DIFFUSE = 0.6
TILT = math.radians(24)
"""How far every solid leans its top towards the viewer (the camera sees it slightly from above)."""
REACH = 1.3
"""Every solid lies within this many radii of its centre (the cone's rim, the farthest, at 1.21)."""
TURN = {"circle": 0.0, "square": math.radians(32), "triangle": 0.0, "cross": math.radians(16)}
"""Turn about each solid's own vertical axis."""


def _rotation(tilt: float, turn: float, roll: float) -> torch.Tensor:
    """Object frame → camera frame: turn about the object's up axis, tilt the top towards the
    viewer, then roll in the image plane (the flat style's in-plane rotation)."""
    ct, st = math.cos(tilt), math.sin(tilt)
    cy, sy = math.cos(turn), math.sin(turn)
    cr, sr = math.cos(roll), math.sin(roll)
    rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, ct, -st], [0.0, st, ct]])
    ry = torch.tensor([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rz = torch.tensor([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return rz @ rx @ ry


def _ray_box(o: torch.Tensor, d: torch.Tensor, half: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab intersection of rays ``o + t d`` (``o`` (3, N), ``d`` (3,)) with an axis-aligned box
    centred at the origin: entry distance (inf on a miss) and the entry face's normal (3, N)."""
    n = o.shape[1]
    t_near = torch.full((n,), -math.inf)
    t_far = torch.full((n,), math.inf)
    axis = torch.zeros(n, dtype=torch.long)
    inside = torch.ones(n, dtype=torch.bool)
    for i in range(3):
        if abs(float(d[i])) < 1e-9:
            inside &= o[i].abs() <= half[i]
            continue
        t1 = (-half[i] - o[i]) / d[i]
        t2 = (half[i] - o[i]) / d[i]
        lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
        better = lo > t_near
        axis = torch.where(better, torch.full_like(axis, i), axis)
        t_near = torch.maximum(t_near, lo)
        t_far = torch.minimum(t_far, hi)
    hit = inside & (t_near <= t_far) & (t_far > 0)
    normal = torch.zeros(3, n)
    sign = -torch.sign(d)
    normal.scatter_(0, axis.unsqueeze(0), sign[axis].unsqueeze(0))
    return torch.where(hit, t_near, torch.full_like(t_near, math.inf)), normal


def _ray_cone(o: torch.Tensor, d: torch.Tensor, radius: float, half_height: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays against a solid cone along the object's ``y`` axis (base disk at ``y = -h``, apex at
    ``y = +h``): entry distance (inf on a miss) and the outward normal there (3, N)."""
    k2 = (radius / (2 * half_height)) ** 2
    ox, oy, oz = o
    dx, dy, dz = (float(v) for v in d)
    a = ox.new_full(ox.shape, dx * dx + dz * dz - k2 * dy * dy)
    w = half_height - oy
    b = 2 * (ox * dx + oz * dz + k2 * w * dy)
    c = ox * ox + oz * oz - k2 * w * w
    disc = b * b - 4 * a * c
    root = torch.sqrt(disc.clamp(min=0))
    safe_a = torch.where(a.abs() < 1e-12, torch.full_like(a, 1e-12), a)
    best = torch.full_like(ox, math.inf)
    for t in ((-b - root) / (2 * safe_a), (-b + root) / (2 * safe_a)):
        y = oy + t * dy
        ok = (disc >= 0) & (t > 0) & (y >= -half_height) & (y <= half_height)
        best = torch.where(ok & (t < best), t, best)
    side = torch.isfinite(best)
    if abs(dy) > 1e-9:
        t_cap = (-half_height - oy) / dy
        cx, cz = ox + t_cap * dx, oz + t_cap * dz
        cap = (t_cap > 0) & (cx * cx + cz * cz <= radius * radius) & (t_cap < best)
    else:
        t_cap = torch.full_like(ox, math.inf)
        cap = torch.zeros_like(side)
    t = torch.where(cap, t_cap, best)
    px, py, pz = ox + torch.where(side | cap, t, 0) * dx, oy + torch.where(side | cap, t, 0) * dy, oz + torch.where(side | cap, t, 0) * dz
    normal = torch.stack([2 * px, 2 * k2 * (half_height - py), 2 * pz])
    normal = normal / (normal * normal).sum(0, keepdim=True).sqrt().clamp(min=1e-9)
    cap_normal = torch.tensor([0.0, -1.0, 0.0]).view(3, 1).expand_as(normal)
    normal = torch.where(cap.unsqueeze(0), cap_normal, normal)
    return t, normal


def _ray_object(shape: str, o: torch.Tensor, d: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry distance and object-frame normal of rays against the solid standing for ``shape``
    (``r``: the flat style's radius)."""
    if shape == "circle":
        radius = 0.92 * r
        # d is a unit vector: |o + t d|^2 = R^2
        b = (o * d.view(3, 1)).sum(0)
        c = (o * o).sum(0) - radius * radius
        disc = b * b - c
        t = -b - torch.sqrt(disc.clamp(min=0))
        hit = (disc >= 0) & (t > 0)
        point = o + t.unsqueeze(0) * d.view(3, 1)
        return torch.where(hit, t, torch.full_like(t, math.inf)), point / radius
    if shape == "square":
        a = 0.6 * r
        return _ray_box(o, d, (a, a, a))
    if shape == "triangle":
        return _ray_cone(o, d, 0.78 * r, 0.92 * r)
    if shape == "cross":
        arm, thick = 0.34 * r, 0.28 * r
        t1, n1 = _ray_box(o, d, (0.98 * r, arm, thick))
        t2, n2 = _ray_box(o, d, (arm, 0.98 * r, thick))
        first = t1 <= t2
        return torch.where(first, t1, t2), torch.where(first.unsqueeze(0), n1, n2)
    raise ValueError(f"unknown shape {shape!r}")


def _place(obj: ShapeObject, index: int, count: int, generator: torch.Generator, jitter: bool, near_first: bool) -> dict[str, float]:
    cx, cy = POSITIONS[obj.position]
    radius = SIZES[obj.size]
    roll, turn, tilt = 0.0, TURN[obj.shape], TILT
    if jitter:
        u = torch.rand(7, generator=generator)
        cx += float(u[0] - 0.5) * 0.08
        cy += float(u[1] - 0.5) * 0.08
        radius *= 1.0 + float(u[2] - 0.5) * 0.2
        roll = float(u[3] - 0.5) * math.radians(16)
        turn += float(u[4] - 0.5) * math.radians(20)
        tilt += float(u[5] - 0.5) * math.radians(10)
        lift_jitter = float(u[6]) * 0.06
    else:
        lift_jitter = 0.0
    # two-object scenes: one object stands clearly higher (nearer) than the other
    rank = 0 if count == 1 else (0 if (index == 0) == near_first else 1)
    lift = (0.30 if rank == 0 and count > 1 else 0.12) + lift_jitter
    return {"cx": cx, "cy": cy, "radius": radius, "roll": roll, "turn": turn, "tilt": tilt, "z": lift + radius}


def _window(centre: float, reach: float, n: int) -> tuple[int, int]:
    """Grid indices ``[lo, hi)`` of the samples within ``reach`` of ``centre`` (fractions)."""
    lo = max(0, min(n, math.floor((centre - reach) * n)))
    hi = max(lo, min(n, math.ceil((centre + reach) * n)))
    return lo, hi


def render_solid_scene(scene: Scene, resolution: int, generator: torch.Generator, jitter: bool = True, supersample: int = 4) -> dict[str, object]:
    """Render one scene in the solid style on a ``supersample``× grid, averaged down.

    Returns ``image`` (1,3,H,W), ``mask`` (1,K,H,W) visible fractions, ``depth`` (1,1,H,W)
    normalised distance (background 1), ``normal`` (1,3,H,W) unit vectors, ``boxes`` (one
    ``(x0, y0, x1, y1)`` footprint box per object, fractions of the image) and ``order``
    (depth rank per object, 0 = nearest).
    """
    n = resolution * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    count = len(scene.objects)
    near_first = bool(torch.rand(1, generator=generator)[0] < 0.5) if (jitter and count > 1) else False
    light = torch.tensor(LIGHT)
    light = light / light.norm()
    view = torch.tensor([0.0, 0.0, -1.0])
    dists, normals, boxes, centres = [], [], [], []
    for index, obj in enumerate(scene.objects):
        p = _place(obj, index, count, generator, jitter, near_first)
        rot = _rotation(p["tilt"], p["turn"], p["roll"])
        # every solid lies within REACH radii of its centre: cast only the rays of that window
        reach = REACH * p["radius"]
        i0, i1 = _window(p["cy"], reach, n)
        j0, j1 = _window(p["cx"], reach, n)
        wx, wy = xs[i0:i1, j0:j1].reshape(-1), ys[i0:i1, j0:j1].reshape(-1)
        origin = torch.stack([wx - p["cx"], p["cy"] - wy, torch.full_like(wx, CAMERA_DISTANCE - p["z"])])
        t_win, n_win = _ray_object(obj.shape, rot.T @ origin, rot.T @ view, p["radius"])
        t = torch.full((n, n), math.inf)
        t[i0:i1, j0:j1] = t_win.view(i1 - i0, j1 - j0)
        normal_k = torch.zeros(3, n, n)
        normal_k[:, i0:i1, j0:j1] = (rot @ n_win).view(3, i1 - i0, j1 - j0)
        dists.append(t.view(-1))
        normals.append(normal_k.view(3, -1))
        hit = torch.isfinite(t)
        rows, cols = hit.any(dim=1).nonzero(), hit.any(dim=0).nonzero()
        if rows.numel():
            boxes.append((float(cols[0]) / n, float(rows[0]) / n, float(cols[-1] + 1) / n, float(rows[-1] + 1) / n))
        else:
            boxes.append((p["cx"], p["cy"], p["cx"], p["cy"]))
        centres.append(CAMERA_DISTANCE - p["z"])
    # the nearest hit wins (a running minimum: much faster than argmin over a short first axis)
    t_min = dists[0]
    nearest = torch.zeros(n * n, dtype=torch.long)
    for k in range(1, count):
        closer = dists[k] < t_min
        nearest = torch.where(closer, k, nearest)
        t_min = torch.where(closer, dists[k], t_min)
    any_hit = torch.isfinite(t_min)
    visible = torch.stack([(nearest == k) & any_hit for k in range(count)]).float()  # (K, N)
    normal = torch.zeros(3, n * n)
    normal[2] = 1.0
    for k in range(count):
        normal = torch.where(visible[k].bool().unsqueeze(0), normals[k], normal)
    shade = AMBIENT + DIFFUSE * (normal * light.view(3, 1)).sum(0).clamp(min=0)
    image = torch.tensor(BACKGROUNDS[scene.background]).view(3, 1).expand(3, n * n).clone()
    for k, obj in enumerate(scene.objects):
        colour = torch.tensor(COLOURS[obj.colour]).view(3, 1)
        image = torch.where(visible[k].bool().unsqueeze(0), colour * shade.unsqueeze(0), image)
    distance = torch.where(any_hit, t_min, torch.full_like(t_min, CAMERA_DISTANCE)) / CAMERA_DISTANCE
    pool = torch.nn.functional.avg_pool2d
    image = pool(image.view(1, 3, n, n), supersample).clamp(0, 1)
    depth = pool(distance.view(1, 1, n, n), supersample).clamp(0, 1)
    mask = pool(visible.view(1, count, n, n), supersample).clamp(0, 1)
    normal = pool(normal.view(1, 3, n, n), supersample)
    normal = normal / (normal * normal).sum(1, keepdim=True).sqrt().clamp(min=1e-6)
    ranks = sorted(range(count), key=lambda k: centres[k])
    order = [ranks.index(k) for k in range(count)]
    return {"image": image, "mask": mask, "depth": depth, "normal": normal, "boxes": boxes, "order": order}
