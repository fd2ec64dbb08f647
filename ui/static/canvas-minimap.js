/* dagfusion canvas — the minimap: a small overview in the canvas's bottom-right corner.
 *
 * It draws every node as a rectangle (in its title colour when it has one, otherwise a colour of
 * its category; a collapsed node as its title bar), the groups as outlines and the part of the
 * graph in view as a white frame.
 * It is redrawn after the canvas draws (at most every MINIMAP_EVERY ms, and not while hidden).
 * Clicking or dragging on it centres the view there. The toolbar's Map button, or M while the
 * canvas has the focus, shows or hides it; the choice is kept in the browser.
 * Methods of CanvasApp (see canvas.js), loaded after the other canvas-*.js files.
 */
(function () {
  "use strict";

  const { el, hashText } = window.DagfusionCanvas.util;
  const { CanvasApp } = window.DagfusionCanvas;

  const MINIMAP_W = 200;
  const MINIMAP_H = 140;
  const MINIMAP_PAD = 8; // px kept free around the graph inside the minimap
  const MINIMAP_EVERY = 80; // ms between two redraws at most
  const MINIMAP_KEY = "dagfusion.minimap";

  const setupLiteGraph = CanvasApp.prototype.setupLiteGraph;

  function categoryColor(category) {
    const hue = parseInt(hashText(category || "other"), 16) % 360;
    return `hsl(${hue}, 45%, 58%)`;
  }

  window.DagfusionCanvas.mixin({
    setupLiteGraph() {
      setupLiteGraph.call(this);
      this.buildMinimap();
    },

    buildMinimap() {
      this.minimapCanvas = el("canvas", { class: "df-minimap-canvas" });
      this.minimapEl = el(
        "div",
        { class: "df-minimap", "data-testid": "df-minimap", title: "Minimap: click or drag to move the view (M shows or hides it)" },
        this.minimapCanvas
      );
      this.minimapCanvas.style.width = MINIMAP_W + "px";
      this.minimapCanvas.style.height = MINIMAP_H + "px";
      // Before the toast, so that a message is drawn over the minimap rather than under it.
      this.stage.insertBefore(this.minimapEl, this.toastEl);
      this.minimapButton = el(
        "button",
        { class: "df-btn", "data-testid": "df-minimap-toggle", title: "Show or hide the minimap (M)", onclick: () => this.toggleMinimap() },
        "Map"
      );
      const fit = this.root.querySelector("[data-testid=df-fit]");
      if (fit) fit.after(this.minimapButton);
      this.minimapLast = null; // what the last redraw drew (see minimapState)
      this.minimapDraws = 0;
      this.minimapTimer = null;

      const canvasDrawn = this.lgc.onDrawOverlay;
      this.lgc.onDrawOverlay = (ctx) => {
        if (canvasDrawn) canvasDrawn.call(this.lgc, ctx);
        this.scheduleMinimap();
      };

      let dragging = null;
      this.minimapCanvas.addEventListener("pointerdown", (e) => {
        if (e.button !== 0) return;
        e.preventDefault();
        dragging = e.pointerId;
        this.minimapCanvas.setPointerCapture(e.pointerId);
        this.canvasEl.focus(); // keys keep acting on the canvas
        this.centreFromMinimap(e);
      });
      this.minimapCanvas.addEventListener("pointermove", (e) => {
        if (dragging === e.pointerId) this.centreFromMinimap(e);
      });
      const stop = (e) => {
        if (dragging !== e.pointerId) return;
        dragging = null;
        if (this.minimapCanvas.hasPointerCapture(e.pointerId)) this.minimapCanvas.releasePointerCapture(e.pointerId);
      };
      this.minimapCanvas.addEventListener("pointerup", stop);
      this.minimapCanvas.addEventListener("pointercancel", stop);
      this.minimapCanvas.addEventListener("contextmenu", (e) => e.preventDefault());
      // M, only while the canvas itself has the focus (so never while typing in a field).
      this.canvasEl.addEventListener("keydown", (e) => {
        if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || e.key.toLowerCase() !== "m") return;
        if (e.target !== this.canvasEl || this.searchBox) return;
        e.preventDefault();
        this.toggleMinimap();
      });

      let shown = true;
      try {
        shown = window.localStorage.getItem(MINIMAP_KEY) !== "hidden";
      } catch (err) {
        /* storage disabled: shown */
      }
      this.showMinimap(shown, { keep: false });
    },

    toggleMinimap() {
      this.showMinimap(this.minimapEl.hidden);
    },

    showMinimap(shown, opts) {
      this.minimapEl.hidden = !shown;
      this.minimapButton.classList.toggle("df-on", shown);
      this.minimapButton.setAttribute("aria-pressed", String(shown));
      this.root.dataset.minimap = shown ? "shown" : "hidden";
      if (!opts || opts.keep !== false) {
        try {
          window.localStorage.setItem(MINIMAP_KEY, shown ? "shown" : "hidden");
        } catch (err) {
          /* storage full or disabled: the choice lasts until the page is reloaded */
        }
      }
      if (shown) this.drawMinimap();
    },

    scheduleMinimap() {
      if (this.minimapTimer || !this.minimapEl || this.minimapEl.hidden) return;
      this.minimapTimer = setTimeout(() => {
        this.minimapTimer = null;
        this.drawMinimap();
      }, MINIMAP_EVERY);
    },

    /* The part of the graph in view, in graph coordinates: [x, y, width, height]. */
    viewRect() {
      const ds = this.lgc.ds;
      const rect = this.canvasEl.getBoundingClientRect();
      return [-ds.offset[0], -ds.offset[1], rect.width / ds.scale, rect.height / ds.scale];
    },

    /* How graph coordinates map onto the minimap: every node and group fits, centred. */
    minimapTransform() {
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const n of this.graph._nodes) {
        const [nx, ny, nw, nh] = n.getBounding(); // title bar included; a collapsed node's title only
        x0 = Math.min(x0, nx);
        y0 = Math.min(y0, ny);
        x1 = Math.max(x1, nx + nw);
        y1 = Math.max(y1, ny + nh);
      }
      for (const g of this.graph._groups || []) {
        const [gx, gy, gw, gh] = g._bounding;
        x0 = Math.min(x0, gx);
        y0 = Math.min(y0, gy);
        x1 = Math.max(x1, gx + gw);
        y1 = Math.max(y1, gy + gh);
      }
      if (x0 === Infinity) [x0, y0, x1, y1] = (([x, y, w, h]) => [x, y, x + w, y + h])(this.viewRect());
      const w = Math.max(x1 - x0, 1);
      const h = Math.max(y1 - y0, 1);
      const scale = Math.min((MINIMAP_W - 2 * MINIMAP_PAD) / w, (MINIMAP_H - 2 * MINIMAP_PAD) / h);
      return { scale, left: (MINIMAP_W - w * scale) / 2 - x0 * scale, top: (MINIMAP_H - h * scale) / 2 - y0 * scale };
    },

    drawMinimap() {
      if (!this.minimapEl || this.minimapEl.hidden || !this.graph) return;
      const canvas = this.minimapCanvas;
      const ratio = window.devicePixelRatio || 1;
      if (canvas.width !== Math.round(MINIMAP_W * ratio)) {
        canvas.width = Math.round(MINIMAP_W * ratio);
        canvas.height = Math.round(MINIMAP_H * ratio);
      }
      const ctx = canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, MINIMAP_W, MINIMAP_H);
      const t = this.minimapTransform();
      const box = (x, y, w, h) => ({ x: t.left + x * t.scale, y: t.top + y * t.scale, w: w * t.scale, h: h * t.scale });
      const drawn = { transform: t, groups: [], nodes: [], view: null };

      for (const g of this.graph._groups || []) {
        const [gx, gy, gw, gh] = g._bounding;
        const r = box(gx, gy, gw, gh);
        ctx.strokeStyle = g.color || "#aaa";
        ctx.lineWidth = 1;
        ctx.strokeRect(r.x + 0.5, r.y + 0.5, Math.max(r.w - 1, 1), Math.max(r.h - 1, 1));
        drawn.groups.push(Object.assign({ title: String(g.title || "") }, r));
      }
      const selected = this.lgc.selected_nodes || {};
      for (const n of this.graph._nodes) {
        const r = box(...n.getBounding());
        const w = Math.max(r.w, 2);
        const h = Math.max(r.h, 2);
        const color = n.color || categoryColor(n.dfEntry && n.dfEntry.category);
        ctx.globalAlpha = n.dfBypass ? 0.45 : 0.9;
        ctx.fillStyle = color;
        ctx.fillRect(r.x, r.y, w, h);
        ctx.globalAlpha = 1;
        // An edge keeps nodes of dark colours visible; the selected nodes' is white.
        ctx.strokeStyle = selected[n.id] ? "#fff" : "rgba(255, 255, 255, 0.3)";
        ctx.lineWidth = selected[n.id] ? 1.5 : 0.75;
        ctx.strokeRect(r.x, r.y, w, h);
        drawn.nodes.push(Object.assign({ id: n.dfId || String(n.id), color }, r));
      }
      const [vx, vy, vw, vh] = this.viewRect();
      const v = box(vx, vy, vw, vh);
      ctx.fillStyle = "rgba(255, 255, 255, 0.08)";
      ctx.fillRect(v.x, v.y, v.w, v.h);
      ctx.strokeStyle = "rgba(255, 255, 255, 0.85)";
      ctx.lineWidth = 1;
      ctx.strokeRect(v.x + 0.5, v.y + 0.5, Math.max(v.w - 1, 1), Math.max(v.h - 1, 1));
      drawn.view = v;
      this.minimapLast = drawn;
      this.minimapDraws++;
    },

    /* Centres the view on the graph point under the pointer on the minimap. */
    centreFromMinimap(e) {
      const t = this.minimapLast ? this.minimapLast.transform : this.minimapTransform();
      const rect = this.minimapCanvas.getBoundingClientRect();
      const x = (e.clientX - rect.left - t.left) / t.scale;
      const y = (e.clientY - rect.top - t.top) / t.scale;
      const ds = this.lgc.ds;
      const view = this.canvasEl.getBoundingClientRect();
      ds.offset = [view.width / (2 * ds.scale) - x, view.height / (2 * ds.scale) - y];
      this.lgc.setDirty(true, true);
      this.drawMinimap();
    },

    /* What the minimap last drew, in its own pixels (read-only; for tests and debugging). */
    minimapState() {
      const last = this.minimapLast;
      return {
        shown: !!this.minimapEl && !this.minimapEl.hidden,
        draws: this.minimapDraws || 0,
        nodes: last ? last.nodes.map((r) => Object.assign({}, r)) : [],
        groups: last ? last.groups.map((r) => Object.assign({}, r)) : [],
        view: last ? Object.assign({}, last.view) : null,
      };
    },
  });
})();
