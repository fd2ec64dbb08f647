/* dagfusion canvas: a litegraph.js editor for dagfusion workflows, mounted by the Gradio app.
 *
 * dagfusion's own code (no third-party code here). litegraph.js is loaded before this file
 * from the package's static/vendor folder, which the build step fills from the npm registry
 * at the version pinned in ui/package-lock.json.
 *
 * Talks to the server only through the canvas component's server functions (df_catalog,
 * df_check, df_save, df_open, df_submit, df_poll, df_cancel, df_paths) and its `value`
 * (the graph, in dagfusion's graph schema, see dagfusion/ui/graph.py).
 */
(function () {
  "use strict";

  const TITLE_H = () => LiteGraph.NODE_TITLE_HEIGHT;
  const SLOT_H = () => LiteGraph.NODE_SLOT_HEIGHT;
  const WIDGET_H = () => LiteGraph.NODE_WIDGET_HEIGHT;
  const WIDGET_STEP = () => LiteGraph.NODE_WIDGET_HEIGHT + 4;
  const NODE_IDENT = /^[A-Za-z_][A-Za-z0-9_-]*$/;
  const STATUS_COLORS = {
    queued: "#9e9e9e",
    running: "#29b6f6",
    cached: "#ab47bc",
    done: "#66bb6a",
    failed: "#ef5350",
    skipped: "#ffa726",
    cancelled: "#8d6e63",
  };
  const STATUS_ICONS = { queued: "…", running: "●", cached: "⟲", done: "✓", failed: "✕", skipped: "↷", cancelled: "■" };
  const RUN_ACTIVE = { queued: true, running: true };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function snake(name) {
    return name
      .replace(/([a-z0-9])([A-Z])/g, "$1_$2")
      .replace(/([A-Z]+)([A-Z][a-z])/g, "$1_$2")
      .replace(/[^A-Za-z0-9_]+/g, "_")
      .toLowerCase()
      .replace(/^_+|_+$/g, "") || "node";
  }

  function short(value) {
    if (value === undefined) return "";
    if (value === null) return "null";
    if (typeof value === "string") return value.length > 28 ? value.slice(0, 27) + "…" : value;
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(+value.toPrecision(6));
    const text = JSON.stringify(value);
    return text.length > 28 ? text.slice(0, 27) + "…" : text;
  }

  function wrapText(ctx, text, width) {
    const words = String(text).split(/\s+/);
    const lines = [];
    let line = "";
    for (const word of words) {
      const candidate = line ? line + " " + word : word;
      if (ctx.measureText(candidate).width > width && line) {
        lines.push(line);
        line = word;
      } else {
        line = candidate;
      }
    }
    if (line) lines.push(line);
    return lines;
  }

  function hashText(text) {
    let h = 0x811c9dc5; // FNV-1a, 32 bits: a short key, not a security measure
    for (let i = 0; i < text.length; i++) {
      h ^= text.charCodeAt(i);
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return h.toString(16);
  }

  function toBase64(buffer) {
    const bytes = new Uint8Array(buffer);
    let binary = "";
    const chunk = 0x8000;
    for (let i = 0; i < bytes.length; i += chunk) {
      binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
    }
    return btoa(binary);
  }

  /* ------------------------------------------------------------------------------------ */

  class CanvasApp {
    constructor(root, props, server, watch) {
      this.root = root;
      this.props = props;
      this.server = server;
      this.watch = watch;
      this.catalog = null;
      this.entries = {};
      this.problems = [];
      this.followed = null; // run id the canvas shows
      this.previewSince = 0;
      this.previews = [];
      this.queue = [];
      this.lastSent = null;
      this.loading = false;
      this.checkSeq = 0;
      this.syncTimer = null;
      this.pollTimer = null;
      this.addCount = 0;
      this.toastTimer = null;
      this.refusals = [];
      this.seq = 0;
    }

    /* --- start-up ---------------------------------------------------------------------- */

    async start() {
      this.buildDom();
      this.setMessage("loading the node catalogue…");
      let catalog = null;
      for (let attempt = 0; attempt < 5 && !catalog; attempt++) {
        catalog = await this.call("df_catalog", null);
        if (!catalog) await new Promise((r) => setTimeout(r, 300 * (attempt + 1)));
      }
      if (!catalog) {
        this.setMessage("could not load the node catalogue from the server", "error");
        return;
      }
      this.catalog = catalog;
      for (const entry of catalog.nodes) this.entries[entry.type] = entry;
      this.setupLiteGraph();
      this.buildPalette();
      const initial = this.props.value;
      // Edits survive a page reload: they are kept in the browser under a key naming the
      // graph the server opened with (a server started on another file starts afresh).
      this.storageKey = "dagfusion.canvas." + hashText(JSON.stringify(initial || null));
      const kept = this.restore();
      if (kept) {
        this.loadGraph(kept, { send: true });
        this.setMessage("restored the canvas as you left it (Clear or Open… to start over)", "ok");
      } else {
        if (initial && typeof initial === "object" && Array.isArray(initial.nodes)) {
          this.loadGraph(initial, { send: false });
        } else {
          this.meta = { metadata: {}, outputs: null, sweep: [], ui: {} };
          this.scheduleSync();
        }
        if (this.props.notice) this.setMessage(this.props.notice, "warn");
        else this.setMessage("ready");
      }
      this.watch("value", () => this.onValueFromServer());
      this.pollSoon(0);
      this.root.dataset.ready = "true";
    }

    restore() {
      try {
        const text = window.localStorage.getItem(this.storageKey);
        const graph = text ? JSON.parse(text) : null;
        return graph && Array.isArray(graph.nodes) && text !== JSON.stringify(this.props.value) ? graph : null;
      } catch (err) {
        return null;
      }
    }

    keep(text) {
      try {
        window.localStorage.setItem(this.storageKey, text);
      } catch (err) {
        /* storage full or disabled: reloading then starts from the server's graph */
      }
    }

    async call(name, arg) {
      try {
        const result = await this.server[name](arg);
        return result === undefined ? null : result;
      } catch (err) {
        console.error("dagfusion: server function", name, "failed", err);
        return null;
      }
    }

    buildDom() {
      this.root.innerHTML = "";
      this.fileInput = el("input", {
        type: "file",
        accept: ".yaml,.yml,.png,application/x-yaml,image/png",
        class: "df-file-input",
        "data-testid": "df-file-input",
        onchange: (e) => {
          const file = e.target.files && e.target.files[0];
          if (file) this.openFile(file);
          e.target.value = "";
        },
      });
      this.runButton = el("button", { class: "df-btn df-primary", "data-testid": "df-run", title: "Validate and queue a run", onclick: () => this.run() }, "▶ Run");
      this.cancelButton = el("button", { class: "df-btn", "data-testid": "df-cancel", title: "Cancel the run shown on the canvas", disabled: true, onclick: () => this.cancel() }, "■ Cancel");
      this.messageEl = el("div", { class: "df-message", "data-testid": "df-message", role: "status" });
      const toolbar = el(
        "div",
        { class: "df-toolbar" },
        this.runButton,
        this.cancelButton,
        el("span", { class: "df-sep" }),
        el("button", { class: "df-btn", "data-testid": "df-open", title: "Open a workflow YAML or a dagfusion PNG", onclick: () => this.fileInput.click() }, "Open…"),
        el("button", { class: "df-btn", "data-testid": "df-save", title: "Download the workflow as YAML (the CLI's format)", onclick: () => this.save() }, "Save YAML"),
        el("button", { class: "df-btn", "data-testid": "df-clear", title: "Remove every node", onclick: () => this.clear() }, "Clear"),
        el("span", { class: "df-sep" }),
        this.messageEl,
        this.fileInput
      );
      this.searchInput = el("input", {
        type: "search",
        class: "df-search",
        placeholder: "Search nodes…",
        "data-testid": "df-search",
        oninput: () => this.filterPalette(),
      });
      this.groupsEl = el("div", { class: "df-groups", "data-testid": "df-palette" });
      const palette = el("aside", { class: "df-palette" }, this.searchInput, this.groupsEl);
      this.canvasEl = el("canvas", { class: "df-canvas", tabindex: "0", "data-testid": "df-canvas" });
      this.toastEl = el("div", { class: "df-toast", "data-testid": "df-toast", role: "alert" });
      this.dropHint = el("div", { class: "df-drop-hint" }, "Drop a workflow YAML or a dagfusion PNG to open it");
      this.stage = el("div", { class: "df-stage" }, this.canvasEl, this.toastEl, this.dropHint);
      this.inspectorEl = el("div", { class: "df-inspector", "data-testid": "df-inspector" });
      this.problemsEl = el("div", { class: "df-problems", "data-testid": "df-problems" });
      this.queueEl = el("div", { class: "df-queue", "data-testid": "df-queue" });
      this.previewsEl = el("div", { class: "df-previews", "data-testid": "df-previews" });
      const side = el(
        "aside",
        { class: "df-side" },
        el("h3", { text: "Node" }),
        this.inspectorEl,
        el("h3", { text: "Problems" }),
        this.problemsEl,
        el("h3", { text: "Runs" }),
        this.queueEl,
        el("h3", { text: "Previews" }),
        this.previewsEl
      );
      this.root.appendChild(el("div", { class: "df-app" }, toolbar, el("div", { class: "df-body" }, palette, this.stage, side)));
      this.renderInspector();
      this.renderProblems();
      this.renderQueue();

      this.stage.addEventListener("dragover", (e) => {
        e.preventDefault();
        const files = e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
        this.stage.classList.toggle("df-dropping", !!files);
      });
      this.stage.addEventListener("dragleave", () => this.stage.classList.remove("df-dropping"));
      this.stage.addEventListener("drop", (e) => this.onDrop(e));
    }

    /* --- litegraph ----------------------------------------------------------------------- */

    setupLiteGraph() {
      const app = this;
      LiteGraph.release_link_on_empty_shows_menu = false;
      LiteGraph.catch_exceptions = true;
      LiteGraph.alt_drag_do_clone_nodes = true;
      for (const [name, info] of Object.entries(this.catalog.types)) {
        LGraphCanvas.link_type_colors[name] = info.color;
      }
      // Connection rules are the registry's, with the reason shown when refused (see connect).
      let drawingInputsOf = null;
      LiteGraph.isValidConnection = function (a, b) {
        // litegraph calls (output, input) when connecting and (input, output) while dimming
        // inputs during a drag from an output; drawNode below tells the two apart.
        return drawingInputsOf ? app.accepts(a, b) : app.accepts(b, a);
      };
      const drawNode = LGraphCanvas.prototype.drawNode;
      LGraphCanvas.prototype.drawNode = function (node, ctx) {
        drawingInputsOf = this.connecting_output ? node : null;
        try {
          return drawNode.call(this, node, ctx);
        } finally {
          drawingInputsOf = null;
        }
      };
      for (const entry of this.catalog.nodes) {
        LiteGraph.registerNodeType(entry.type, this.nodeClass(entry));
      }
      this.graph = new LGraph();
      const lgc = (this.lgc = new LGraphCanvas(this.canvasEl, this.graph));
      lgc.show_info = false;
      lgc.render_canvas_border = false;
      lgc.allow_searchbox = true;
      lgc.onNodeMoved = () => this.scheduleSync({ layout: true });
      lgc.onSelectionChange = () => this.renderInspector();
      lgc.onNodeSelected = () => this.renderInspector();
      lgc.onNodeDeselected = () => this.renderInspector();
      this.graph.onNodeAdded = (node) => {
        if (node.dfEntry) {
          node.dfSeq = ++this.seq;
          if (!node.dfId || this.nodeById(node.dfId, node)) node.dfId = this.freshId(node.dfEntry);
          node.updateTitle();
        }
        if (!this.loading) this.scheduleSync();
      };
      this.graph.onNodeRemoved = () => {
        if (!this.loading) this.scheduleSync();
        this.renderInspector();
      };
      this.graph.onConnectionChange = () => {
        if (!this.loading) this.scheduleSync();
      };
      const resize = () => {
        const rect = this.stage.getBoundingClientRect();
        if (rect.width > 0 && rect.height > 0) lgc.resize(Math.floor(rect.width), Math.floor(rect.height));
      };
      new ResizeObserver(resize).observe(this.stage);
      resize();
      this.graph.start();
    }

    accepts(expected, got) {
      if (!this.catalog) return true;
      const list = this.catalog.accepts[expected];
      if (!list) return expected === got;
      return list.indexOf(got) !== -1;
    }

    nodeClass(entry) {
      const app = this;
      function DagfusionNode(title) {
        this.title = entry.title;
        this.dfEntry = entry;
        this.dfType = entry.type;
        this.dfId = null;
        this.dfVersion = null;
        this.dfInputs = {};
        this.dfOrder = entry.inputs.map((i) => i.name);
        this.dfUi = {};
        this.dfStatus = null;
        this.dfProgress = null;
        this.dfProblems = [];
        this.dfError = null;
        this.dfPreview = null;
        this.serialize_widgets = false;
        const socketOnly = entry.inputs.filter((i) => !i.widget);
        const withWidget = entry.inputs.filter((i) => i.widget);
        for (const spec of socketOnly) this.addDfInput(spec);
        for (const spec of entry.outputs) {
          const color = app.typeColor(spec.type);
          this.addOutput(spec.name, spec.type, { color_on: color, color_off: color, dfSpec: spec, tooltip: spec.description });
        }
        const rows = Math.max(socketOnly.length, entry.outputs.length);
        this.widgets_start_y = rows * SLOT_H() + 6;
        withWidget.forEach((spec, index) => {
          const slot = this.addDfInput(spec);
          slot.label = "";
          slot.pos = [4, this.widgets_start_y + 2 + index * WIDGET_STEP() + WIDGET_H() / 2];
          this.addDfWidget(spec);
        });
        this.size = this.computeSize();
      }
      DagfusionNode.title = entry.title;
      DagfusionNode.desc = entry.summary;
      const proto = DagfusionNode.prototype;

      proto.addDfInput = function (spec) {
        const color = app.typeColor(spec.type);
        return this.addInput(spec.name, spec.type, { color_on: color, color_off: color, dfSpec: spec });
      };

      proto.addDfWidget = function (spec) {
        const value = this.effectiveValue(spec.name);
        const callback = (v) => app.setConstant(this, spec.name, v, { fromWidget: true });
        let w;
        switch (spec.widget) {
          case "int":
          case "seed":
            w = this.addWidget("number", spec.name, value ?? 0, callback, { min: spec.min ?? -Infinity, max: spec.max ?? Infinity, step: 10, precision: 0 });
            break;
          case "float":
          case "slider": {
            const step = (spec.ui && spec.ui.step) || 0.1;
            w = this.addWidget("number", spec.name, value ?? 0, callback, { min: spec.min ?? -Infinity, max: spec.max ?? Infinity, step: step * 10, precision: 3 });
            break;
          }
          case "combo":
            w = this.addWidget("combo", spec.name, value ?? spec.choices[0], callback, { values: spec.choices });
            break;
          case "toggle":
            w = this.addWidget("toggle", spec.name, !!value, callback, {});
            break;
          default:
            w = this.addWidget("text", spec.name, value ?? "", callback, { multiline: spec.widget === "multiline" });
        }
        w.dfSpec = spec;
        return w;
      };

      proto.effectiveValue = function (name) {
        if (Object.prototype.hasOwnProperty.call(this.dfInputs, name)) return this.dfInputs[name];
        const spec = this.dfEntry.inputs.find((i) => i.name === name);
        return spec && spec.has_default ? spec.default : undefined;
      };

      proto.inputSlot = function (name) {
        return this.inputs ? this.inputs.findIndex((s) => s.name === name) : -1;
      };

      proto.outputSlot = function (name) {
        return this.outputs ? this.outputs.findIndex((s) => s.name === name) : -1;
      };

      proto.isLinked = function (name) {
        const index = this.inputSlot(name);
        return index >= 0 && this.inputs[index].link != null;
      };

      proto.refreshWidgets = function () {
        for (const w of this.widgets || []) {
          const type = w.dfWidgetType || w.type;
          const value = this.effectiveValue(w.name);
          if (type === "toggle") w.value = !!value;
          else if (type === "number") w.value = typeof value === "number" ? value : 0;
          else w.value = value ?? "";
          // A linked input shows where its value comes from instead of an editable widget.
          w.disabled = this.isLinked(w.name);
          if (w.disabled) {
            w.dfWidgetType = type;
            w.type = "df_linked";
            w.draw = drawLinkedWidget;
          } else if (w.dfWidgetType) {
            w.type = w.dfWidgetType;
            delete w.dfWidgetType;
            delete w.draw;
          }
        }
        this.setDirtyCanvas(true, true);
      };

      function drawLinkedWidget(ctx, node, width, y, height) {
        const index = node.inputSlot(this.name);
        const link = index >= 0 ? node.graph && node.graph.links[node.inputs[index].link] : null;
        const origin = link ? node.graph.getNodeById(link.origin_id) : null;
        const from = origin ? `${origin.dfId}.${origin.outputs[link.origin_slot].name}` : "a link";
        ctx.save();
        ctx.fillStyle = "#1a1a1a";
        ctx.strokeStyle = "#444";
        ctx.beginPath();
        ctx.roundRect(15, y, width - 30, height, [height * 0.5]);
        ctx.fill();
        ctx.stroke();
        ctx.fillStyle = "#8ab4f8";
        ctx.font = "12px Arial";
        ctx.textAlign = "left";
        ctx.fillText(`${this.name} ← ${from}`, 26, y + height * 0.7);
        ctx.restore();
      }

      proto.updateTitle = function () {
        const defaultId = snake(entry.title);
        const base = this.dfId && this.dfId.replace(/_\d+$/, "") !== defaultId ? `${entry.title} · ${this.dfId}` : entry.title;
        this.title = base;
      };

      proto.computeSize = function () {
        const ctx = app.lgc ? app.lgc.ctx : null;
        const measure = (t) => (ctx ? (ctx.font = "14px Arial", ctx.measureText(t).width) : t.length * 8);
        let width = Math.max(200, measure(this.title || "") + 60);
        const socketRows = Math.max((this.inputs || []).filter((s) => !s.pos).length, (this.outputs || []).length);
        for (let i = 0; i < socketRows; i++) {
          const a = (this.inputs || []).filter((s) => !s.pos)[i];
          const b = (this.outputs || [])[i];
          width = Math.max(width, (a ? measure(a.name) : 0) + (b ? measure(b.name) : 0) + 60);
        }
        for (const w of this.widgets || []) {
          const value = w.type === "number" ? short(w.value) : String(w.value ?? "").slice(0, 30);
          width = Math.max(width, Math.min(360, measure(w.name) + measure(value) + 80));
        }
        if (this.size && this.size[0] > width) width = this.size[0];
        const widgets = (this.widgets || []).length;
        let height = (this.widgets_start_y || socketRows * SLOT_H() + 6) + (widgets ? widgets * WIDGET_STEP() + 4 : 0);
        height = Math.max(height, SLOT_H());
        if (this.dfPreview && this.dfPreview.complete && this.dfPreview.naturalWidth) {
          const img = this.dfPreview;
          const w = width - 20;
          height += 8 + Math.min(256, (w * img.naturalHeight) / img.naturalWidth);
        }
        return [width, height];
      };

      proto.onResize = function () {
        const wanted = this.computeSize();
        if (this.size[1] < wanted[1]) this.size[1] = wanted[1];
      };

      proto.connect = function (slot, target, targetSlot) {
        if (typeof slot === "string") slot = this.outputSlot(slot);
        if (typeof target === "number") target = this.graph.getNodeById(target);
        if (target && typeof targetSlot === "string") targetSlot = target.inputSlot ? target.inputSlot(targetSlot) : target.findInputSlot(targetSlot);
        const output = this.outputs && this.outputs[slot];
        const input = target && target.inputs && target.inputs[targetSlot];
        if (output && input) {
          const why = app.refusal(this, output, target, input);
          if (why) {
            app.refuse(why);
            return null;
          }
        }
        return LGraphNode.prototype.connect.call(this, slot, target, targetSlot);
      };

      proto.connectByType = function (slot, target, type) {
        // A link dropped on a node's body: the first free input that accepts it, else any that does.
        const output = this.outputs && this.outputs[slot];
        if (!output || !target.inputs) return null;
        const fits = target.inputs.map((input, i) => [input, i]).filter(([input]) => app.accepts(input.type, output.type));
        const choice = fits.find(([input]) => input.link == null) || fits[0];
        if (!choice) {
          const title = target.dfId || target.title;
          app.refuse(`Cannot connect ${this.dfId}.${output.name} (${output.type}): no input of ${title} accepts ${output.type}`);
          return null;
        }
        return this.connect(slot, target, choice[1]);
      };

      proto.connectByTypeOutput = function (slot, source, type) {
        const input = this.inputs && this.inputs[slot];
        if (!input || !source.outputs) return null;
        const index = source.outputs.findIndex((output) => app.accepts(input.type, output.type));
        if (index < 0) {
          app.refuse(`Cannot connect to ${this.dfId}.${input.name}: ${source.dfId || source.title} has no output that is a ${input.type}`);
          return null;
        }
        return source.connect(index, this, slot);
      };

      proto.onConnectionsChange = function () {
        this.refreshWidgets();
        if (app.selectedNode() === this) app.renderInspector();
      };

      proto.onSerialize = function (o) {
        o.df = { id: this.dfId, inputs: JSON.parse(JSON.stringify(this.dfInputs)), order: this.dfOrder.slice(), ui: JSON.parse(JSON.stringify(this.dfUi)), version: this.dfVersion };
      };

      proto.onConfigure = function (o) {
        if (o && o.df) {
          this.dfId = o.df.id || null;
          this.dfInputs = o.df.inputs || {};
          this.dfOrder = o.df.order || this.dfOrder;
          this.dfUi = o.df.ui || {};
          this.dfVersion = o.df.version || null;
          this.refreshWidgets();
        }
      };

      proto.getExtraMenuOptions = function () {
        return [{ content: "Show in inspector", callback: () => app.select(this) }];
      };

      proto.onDrawForeground = function (ctx) {
        app.drawNodeDecorations(this, ctx);
      };

      return DagfusionNode;
    }

    typeColor(type) {
      const info = this.catalog && this.catalog.types[type];
      return info ? info.color : "#9e9e9e";
    }

    refusal(source, output, target, input) {
      const src = `${source.dfId}.${output.name}`;
      const dst = `${target.dfId}.${input.name}`;
      if (source === target) return `Cannot connect ${src} to ${dst}: a node cannot feed itself`;
      if (!this.accepts(input.type, output.type)) {
        const allowed = (this.catalog.accepts[input.type] || []).filter((t) => t !== "ANY");
        return `Cannot connect ${src} (${output.type}) to ${dst}: ${input.name} expects ${input.type}` +
          (allowed.length > 1 ? ` (it accepts ${allowed.join(", ")})` : "");
      }
      // A link that closes a loop: does `target` already feed `source`?
      const seen = new Set();
      const stack = [target];
      while (stack.length) {
        const node = stack.pop();
        if (node === source) return `Cannot connect ${src} to ${dst}: it would make a cycle`;
        if (seen.has(node)) continue;
        seen.add(node);
        for (const out of node.outputs || []) {
          for (const linkId of out.links || []) {
            const link = this.graph.links[linkId];
            if (link) stack.push(this.graph.getNodeById(link.target_id));
          }
        }
      }
      return null;
    }

    refuse(message) {
      if (this.loading) {
        this.refusals.push(message);
        return;
      }
      this.toast(message, "error");
      this.root.dataset.lastRefusal = message;
    }

    /* --- drawing statuses, progress, problems and previews on nodes --------------------- */

    drawNodeDecorations(node, ctx) {
      const [w, h] = node.size;
      const titleH = TITLE_H();
      ctx.save();
      const status = node.dfStatus;
      const problems = node.dfProblems || [];
      if (status && STATUS_COLORS[status]) {
        const color = STATUS_COLORS[status];
        ctx.strokeStyle = color;
        ctx.lineWidth = status === "running" ? 3 : 2;
        ctx.beginPath();
        ctx.roundRect(-2, -titleH - 2, w + 4, h + titleH + 4, 8);
        ctx.stroke();
        let label = `${STATUS_ICONS[status] || ""} ${status}`;
        const p = node.dfProgress;
        if (status === "running" && p && p.total) label += ` ${p.step}/${p.total}`;
        ctx.font = "bold 12px Arial";
        const tw = ctx.measureText(label).width + 12;
        ctx.fillStyle = color;
        ctx.beginPath();
        ctx.roundRect(0, -titleH - 20, tw, 17, 5);
        ctx.fill();
        ctx.fillStyle = "#111";
        ctx.textAlign = "left";
        ctx.fillText(label, 6, -titleH - 7);
        if (p && p.total) {
          const frac = Math.max(0, Math.min(1, p.step / p.total));
          ctx.fillStyle = "#333";
          ctx.fillRect(0, -3, w, 3);
          ctx.fillStyle = color;
          ctx.fillRect(0, -3, w * frac, 3);
        }
      }
      if (problems.length) {
        ctx.strokeStyle = "#ff5252";
        ctx.lineWidth = 2;
        ctx.setLineDash([6, 4]);
        ctx.beginPath();
        ctx.roundRect(-5, -titleH - 5, w + 10, h + titleH + 10, 10);
        ctx.stroke();
        ctx.setLineDash([]);
        ctx.fillStyle = "#ff5252";
        ctx.beginPath();
        ctx.arc(w - 14, -titleH / 2, 9, 0, Math.PI * 2);
        ctx.fill();
        ctx.fillStyle = "#fff";
        ctx.font = "bold 13px Arial";
        ctx.textAlign = "center";
        ctx.fillText("!", w - 14, -titleH / 2 + 5);
        // mark the inputs concerned
        for (const problem of problems) {
          if (!problem.input) continue;
          const index = node.inputSlot(problem.input);
          if (index < 0) continue;
          const pos = node.getConnectionPos(true, index);
          ctx.strokeStyle = "#ff5252";
          ctx.lineWidth = 2;
          ctx.beginPath();
          ctx.arc(pos[0] - node.pos[0], pos[1] - node.pos[1], 7, 0, Math.PI * 2);
          ctx.stroke();
        }
      }
      const lines = [];
      for (const problem of problems) lines.push(["#ff8a80", (problem.input ? problem.input + ": " : "") + problem.message]);
      if (node.dfError) lines.push(["#ff8a80", node.dfError]);
      if (lines.length) {
        ctx.font = "12px Arial";
        ctx.textAlign = "left";
        let y = h + 18;
        for (const [color, text] of lines.slice(0, 4)) {
          for (const line of wrapText(ctx, text, Math.max(w, 240)).slice(0, 3)) {
            ctx.fillStyle = color;
            ctx.fillText(line, 0, y);
            y += 15;
          }
        }
      }
      const img = node.dfPreview;
      if (img && img.complete && img.naturalWidth) {
        const top = (node.widgets_start_y || 0) + ((node.widgets || []).length ? node.widgets.length * WIDGET_STEP() + 4 : 0) + 4;
        const maxW = w - 20;
        const maxH = Math.max(16, h - top - 6);
        const scale = Math.min(maxW / img.naturalWidth, maxH / img.naturalHeight);
        const dw = img.naturalWidth * scale;
        const dh = img.naturalHeight * scale;
        ctx.imageSmoothingEnabled = scale < 1;
        ctx.drawImage(img, (w - dw) / 2, top, dw, dh);
      }
      ctx.restore();
    }

    /* --- palette -------------------------------------------------------------------------- */

    buildPalette() {
      this.groupsEl.innerHTML = "";
      const groups = {};
      for (const category of this.catalog.categories) {
        const list = el("div", { class: "df-group-items" });
        const details = el("details", { class: "df-group", open: true, dataset: { category } }, el("summary", { text: category.split("/").join(" / ") }), list);
        groups[category] = list;
        this.groupsEl.appendChild(details);
      }
      for (const entry of this.catalog.nodes) {
        const item = el(
          "div",
          {
            class: "df-item",
            draggable: "true",
            title: `${entry.type} ${entry.version}${entry.plugin ? " — " + entry.plugin : ""}\n\n${entry.description}`,
            "data-testid": "df-palette-item",
            dataset: { type: entry.type, search: `${entry.title} ${entry.type} ${entry.category} ${entry.description} ${entry.plugin || ""}`.toLowerCase() },
            ondragstart: (e) => {
              e.dataTransfer.setData("application/x-dagfusion-node", entry.type);
              e.dataTransfer.effectAllowed = "copy";
            },
            onclick: () => this.addNodeAtCenter(entry.type),
          },
          el("div", { class: "df-item-title" }, el("span", { text: entry.title }), el("small", { text: entry.type })),
          el("div", { class: "df-item-desc", text: entry.summary || "" })
        );
        groups[entry.category].appendChild(item);
      }
    }

    filterPalette() {
      const words = this.searchInput.value.toLowerCase().split(/\s+/).filter(Boolean);
      for (const group of this.groupsEl.querySelectorAll(".df-group")) {
        let shown = 0;
        for (const item of group.querySelectorAll(".df-item")) {
          const match = words.every((w) => item.dataset.search.includes(w));
          item.hidden = !match;
          if (match) shown++;
        }
        group.hidden = shown === 0;
        if (words.length) group.open = true;
      }
    }

    /* --- nodes ---------------------------------------------------------------------------- */

    freshId(entry) {
      const base = snake(entry.title);
      if (!this.nodeById(base)) return base;
      for (let n = 2; ; n++) if (!this.nodeById(`${base}_${n}`)) return `${base}_${n}`;
    }

    nodeById(id, except) {
      if (!this.graph) return null;
      return this.graph._nodes.find((n) => n.dfId === id && n !== except) || null;
    }

    createNode(type, options) {
      const entry = this.entries[type];
      if (!entry) return null;
      const node = LiteGraph.createNode(type);
      node.dfId = options.id || this.freshId(entry);
      node.dfInputs = Object.assign({}, options.inputs || {});
      if (options.order && options.order.length) {
        const rest = entry.inputs.map((i) => i.name).filter((n) => options.order.indexOf(n) === -1);
        node.dfOrder = options.order.concat(rest);
      }
      node.dfUi = Object.assign({}, options.ui || {});
      node.dfVersion = options.version || null;
      node.pos = options.pos ? [options.pos[0], options.pos[1]] : [40, 40];
      node.updateTitle();
      node.refreshWidgets();
      node.size = node.computeSize();
      this.graph.add(node);
      return node;
    }

    addNode(type, pos) {
      const node = this.createNode(type, { pos });
      if (node) {
        this.select(node);
        this.scheduleSync();
      }
      return node;
    }

    addNodeAtCenter(type) {
      const ds = this.lgc.ds;
      const rect = this.canvasEl.getBoundingClientRect();
      const center = ds.convertCanvasToOffset([rect.width / 2, rect.height / 2]);
      const shift = (this.addCount++ % 6) * 30;
      return this.addNode(type, [Math.round(center[0] - 100 + shift), Math.round(center[1] - 60 + shift)]);
    }

    selectedNode() {
      if (!this.lgc) return null;
      const selected = Object.values(this.lgc.selected_nodes || {});
      return selected.length === 1 ? selected[0] : null;
    }

    select(node) {
      this.lgc.selectNode(node, false);
      this.renderInspector();
    }

    setConstant(node, name, value, opts) {
      const spec = node.dfEntry.inputs.find((i) => i.name === name);
      if (value === undefined) delete node.dfInputs[name];
      else node.dfInputs[name] = value;
      if (spec && !opts?.fromWidget) node.refreshWidgets();
      node.size = node.computeSize();
      node.setDirtyCanvas(true, true);
      if (!opts || !opts.fromInspector) {
        if (this.selectedNode() === node) this.renderInspector();
      }
      this.scheduleSync();
    }

    renameNode(node, id) {
      if (!NODE_IDENT.test(id)) return "an id starts with a letter or '_' and holds only letters, digits, '_' and '-'";
      if (this.nodeById(id, node)) return `another node is called ${id}`;
      node.dfId = id;
      node.updateTitle();
      node.setDirtyCanvas(true, true);
      this.scheduleSync();
      return null;
    }

    clear() {
      if (this.graph._nodes.length && !window.confirm("Remove every node from the canvas?")) return;
      this.loading = true;
      this.graph.clear();
      this.loading = false;
      this.meta = { metadata: {}, outputs: null, sweep: [], ui: {} };
      this.scheduleSync();
      this.renderInspector();
    }

    /* --- graph <-> canvas ---------------------------------------------------------------- */

    toGraph() {
      const nodes = [];
      const links = [];
      // File order is creation order (litegraph reorders _nodes to draw the selected on top).
      const ordered = this.graph._nodes.filter((n) => n.dfEntry).sort((a, b) => a.dfSeq - b.dfSeq);
      for (const node of ordered) {
        const inputs = {};
        for (const [name, value] of Object.entries(node.dfInputs)) {
          if (!node.isLinked(name)) inputs[name] = value;
        }
        nodes.push({
          id: node.dfId,
          type: node.dfType,
          version: node.dfVersion,
          inputs,
          order: node.dfOrder,
          pos: [Math.round(node.pos[0]), Math.round(node.pos[1])],
          ui: node.dfUi,
        });
        for (const slot of node.inputs || []) {
          if (slot.link == null) continue;
          const link = this.graph.links[slot.link];
          const origin = link && this.graph.getNodeById(link.origin_id);
          if (!origin || !origin.dfEntry) continue;
          links.push({ from: [origin.dfId, origin.outputs[link.origin_slot].name], to: [node.dfId, slot.name] });
        }
      }
      return { version: 1, nodes, links, workflow: this.meta || { metadata: {}, outputs: null, sweep: [], ui: {} } };
    }

    loadGraph(graph, { send = true } = {}) {
      const missing = [];
      this.loading = true;
      this.refusals = [];
      try {
        this.graph.clear();
        this.meta = graph.workflow || { metadata: {}, outputs: null, sweep: [], ui: {} };
        const byId = {};
        for (const gn of graph.nodes || []) {
          if (!this.entries[gn.type]) {
            missing.push(`${gn.id} (${gn.type})`);
            continue;
          }
          byId[gn.id] = this.createNode(gn.type, gn);
        }
        for (const link of graph.links || []) {
          const src = byId[link.from[0]];
          const dst = byId[link.to[0]];
          if (!src || !dst) continue;
          const out = src.outputSlot(link.from[1]);
          const inp = dst.inputSlot(link.to[1]);
          if (out < 0 || inp < 0) {
            this.refusals.push(`link ${link.from.join(".")} → ${link.to.join(".")} names a missing socket`);
            continue;
          }
          src.connect(out, dst, inp);
        }
        for (const node of this.graph._nodes) node.refreshWidgets && node.refreshWidgets();
        this.tidy((graph.nodes || []).filter((gn) => gn.auto_pos && byId[gn.id]).map((gn) => byId[gn.id]));
      } finally {
        this.loading = false;
      }
      this.clearRunState();
      this.fitView();
      this.renderInspector();
      if (missing.length || this.refusals.length) {
        this.toast(`Some parts could not be drawn: ${missing.concat(this.refusals).join("; ")}`, "error");
      }
      if (send) this.syncNow();
      else this.lastSent = JSON.stringify(graph);
      this.checkNow();
    }

    tidy(nodes) {
      // Nodes the server laid out by depth (one column per x): respace the columns and rows
      // with the real node sizes, so wide or tall nodes do not overlap.
      if (!nodes.length) return;
      const columns = new Map();
      for (const node of nodes) {
        const key = node.pos[0];
        if (!columns.has(key)) columns.set(key, []);
        columns.get(key).push(node);
      }
      let x = Math.min(...nodes.map((n) => n.pos[0]));
      const top = Math.min(...nodes.map((n) => n.pos[1]));
      for (const key of [...columns.keys()].sort((a, b) => a - b)) {
        const column = columns.get(key).sort((a, b) => a.pos[1] - b.pos[1]);
        let y = top;
        for (const node of column) {
          node.pos = [x, y];
          y += node.size[1] + TITLE_H() + 60;
        }
        x += Math.max(...column.map((n) => n.size[0])) + 70;
      }
    }

    fitView() {
      const nodes = this.graph._nodes;
      const ds = this.lgc.ds;
      if (!nodes.length) {
        ds.offset = [0, 0];
        ds.scale = 1;
        this.lgc.setDirty(true, true);
        return;
      }
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]);
        y0 = Math.min(y0, n.pos[1] - TITLE_H() - 24);
        x1 = Math.max(x1, n.pos[0] + n.size[0]);
        y1 = Math.max(y1, n.pos[1] + n.size[1] + 40);
      }
      const rect = this.canvasEl.getBoundingClientRect();
      const width = rect.width || 800;
      const height = rect.height || 600;
      // Not below 0.6: litegraph stops drawing socket names there.
      const scale = Math.max(0.6, Math.min(1, (width - 40) / (x1 - x0), (height - 40) / (y1 - y0)));
      ds.scale = scale;
      ds.offset = [20 / scale - x0, 20 / scale - y0];
      this.lgc.setDirty(true, true);
    }

    onValueFromServer() {
      const value = this.props.value;
      if (!value || typeof value !== "object" || !Array.isArray(value.nodes)) return;
      if (JSON.stringify(value) === this.lastSent) return; // our own edit coming back
      this.loadGraph(value, { send: false });
    }

    scheduleSync(opts) {
      if (this.loading) return;
      clearTimeout(this.syncTimer);
      const layoutOnly = opts && opts.layout;
      this.pendingCheck = this.pendingCheck || !layoutOnly;
      this.syncTimer = setTimeout(() => {
        this.syncNow();
        if (this.pendingCheck) this.checkNow();
        this.pendingCheck = false;
      }, 200);
    }

    syncNow() {
      const graph = this.toGraph();
      const text = JSON.stringify(graph);
      if (text === this.lastSent) return graph;
      this.lastSent = text;
      this.props.value = graph; // the component's value: what Python event handlers receive
      if (this.storageKey) this.keep(text);
      return graph;
    }

    async checkNow() {
      const seq = ++this.checkSeq;
      const result = await this.call("df_check", this.toGraph());
      if (!result || seq !== this.checkSeq) return;
      this.showProblems(result.problems || [], result.warnings || []);
    }

    showProblems(problems, warnings) {
      this.problems = problems;
      this.warnings = warnings || [];
      for (const node of this.graph._nodes) node.dfProblems = [];
      for (const problem of problems) {
        const node = problem.node && this.nodeById(problem.node);
        if (node) node.dfProblems.push(problem);
      }
      this.lgc.setDirty(true, true);
      this.renderProblems();
      const selected = this.selectedNode();
      if (selected) this.renderInspectorProblems(selected);
      this.root.dataset.problems = String(problems.length);
    }

    renderProblems() {
      const list = this.problemsEl;
      list.innerHTML = "";
      const problems = this.problems || [];
      if (!problems.length) {
        list.appendChild(el("div", { class: "df-empty", text: this.graph && this.graph._nodes.length ? "No problems: ready to run." : "Add nodes from the palette." }));
      }
      for (const problem of problems) {
        const where = [problem.node, problem.input].filter(Boolean).join(".");
        list.appendChild(
          el(
            "div",
            {
              class: "df-problem",
              "data-testid": "df-problem",
              dataset: { node: problem.node || "", input: problem.input || "", code: problem.code },
              onclick: () => {
                const node = problem.node && this.nodeById(problem.node);
                if (node) this.select(node);
              },
            },
            where ? el("b", { text: where + ": " }) : null,
            problem.message
          )
        );
      }
      for (const warning of this.warnings || []) list.appendChild(el("div", { class: "df-warning", text: warning }));
    }

    /* --- inspector (parameter widgets from each input's spec) ---------------------------- */

    renderInspector() {
      const box = this.inspectorEl;
      if (!box) return;
      box.innerHTML = "";
      const node = this.selectedNode();
      if (!node || !node.dfEntry) {
        box.appendChild(el("div", { class: "df-empty", text: "Select a node to edit its inputs. Click or drag a palette entry to add one." }));
        box.dataset.node = "";
        return;
      }
      const entry = node.dfEntry;
      box.dataset.node = node.dfId;
      const idInput = el("input", { type: "text", value: node.dfId, class: "df-id", "data-testid": "df-node-id" });
      const idError = el("div", { class: "df-field-error" });
      idInput.addEventListener("change", () => {
        const why = this.renameNode(node, idInput.value.trim());
        idError.textContent = why || "";
        if (why) idInput.value = node.dfId;
      });
      box.appendChild(el("div", { class: "df-insp-head" }, el("div", { class: "df-insp-title", text: entry.title }), el("code", { text: `${entry.type} ${entry.version}` })));
      box.appendChild(el("label", { class: "df-field-row" }, el("span", { text: "id" }), idInput));
      box.appendChild(idError);
      if (entry.description) box.appendChild(el("p", { class: "df-insp-desc", text: entry.description }));
      for (const spec of entry.inputs) box.appendChild(this.inputField(node, spec));
      if (entry.outputs.length) {
        box.appendChild(
          el(
            "div",
            { class: "df-outputs" },
            el("span", { text: "outputs: " }),
            entry.outputs.map((o) => el("span", { class: "df-out", title: o.description || "" }, el("i", { class: "df-dot", style: `background:${this.typeColor(o.type)}` }), `${o.name} `, el("small", { text: o.type })))
          )
        );
      }
      this.renderInspectorProblems(node);
    }

    renderInspectorProblems(node) {
      for (const holder of this.inspectorEl.querySelectorAll("[data-problem-for]")) {
        const name = holder.dataset.problemFor;
        const messages = (node.dfProblems || []).filter((p) => p.input === name).map((p) => p.message);
        holder.textContent = messages.join("; ");
        const field = holder.closest(".df-field");
        field.classList.toggle("df-invalid", messages.length > 0);
        // The server's verdict replaces the instant bounds check made while typing.
        const local = field.querySelector("[data-testid=df-field-error]");
        if (local && local.dataset.kind === "bound") local.textContent = "";
      }
    }

    inputField(node, spec) {
      const linked = node.isLinked(spec.name);
      const explicit = Object.prototype.hasOwnProperty.call(node.dfInputs, spec.name);
      const value = node.effectiveValue(spec.name);
      const field = el("div", { class: "df-field", "data-testid": "df-field", dataset: { input: spec.name } });
      const badge = spec.required ? "required" : spec.optional ? "optional" : "";
      field.appendChild(
        el(
          "div",
          { class: "df-field-label" },
          el("i", { class: "df-dot", style: `background:${this.typeColor(spec.type)}` }),
          el("b", { text: spec.name }),
          el("small", { text: ` ${spec.type}${badge ? " · " + badge : ""}` }),
          explicit && spec.has_default && !linked
            ? el("button", { class: "df-reset", title: `reset to the default (${short(spec.default)})`, onclick: () => this.setConstant(node, spec.name, undefined) }, "↺")
            : null
        )
      );
      const local = el("div", { class: "df-field-error", "data-testid": "df-field-error" });
      if (linked) {
        const link = this.graph.links[node.inputs[node.inputSlot(spec.name)].link];
        const origin = link && this.graph.getNodeById(link.origin_id);
        field.appendChild(el("div", { class: "df-linked", text: origin ? `← ${origin.dfId}.${origin.outputs[link.origin_slot].name}` : "← linked" }));
      } else if (!spec.widget) {
        field.appendChild(el("div", { class: "df-linked df-socket-only", text: `connect a ${spec.type} output` }));
      } else {
        field.appendChild(this.widgetFor(node, spec, value, local));
      }
      if (spec.description) field.appendChild(el("div", { class: "df-field-desc", text: spec.description }));
      field.appendChild(local);
      field.appendChild(el("div", { class: "df-field-error", dataset: { problemFor: spec.name } }));
      return field;
    }

    boundProblem(spec, value) {
      if (spec.choices && spec.choices.length && !spec.choices.some((c) => JSON.stringify(c) === JSON.stringify(value))) return `expected one of ${JSON.stringify(spec.choices)}`;
      if (typeof value === "number") {
        if (!Number.isFinite(value)) return "expected a number";
        if (spec.min !== null && spec.min !== undefined && value < spec.min) return `expected a value >= ${spec.min}, got ${value}`;
        if (spec.max !== null && spec.max !== undefined && value > spec.max) return `expected a value <= ${spec.max}, got ${value}`;
      }
      return null;
    }

    widgetFor(node, spec, value, errorEl) {
      const set = (v) => {
        const why = v === undefined ? null : this.boundProblem(spec, v);
        errorEl.textContent = why || "";
        errorEl.dataset.kind = "bound";
        this.setConstant(node, spec.name, v, { fromInspector: true });
      };
      const attrs = { "data-testid": "df-input", name: spec.name, "aria-label": spec.name };
      switch (spec.widget) {
        case "combo": {
          const select = el("select", attrs);
          spec.choices.forEach((choice, i) => {
            const option = el("option", { value: String(i), text: short(choice) });
            if (JSON.stringify(choice) === JSON.stringify(value)) option.selected = true;
            select.appendChild(option);
          });
          select.addEventListener("change", () => set(spec.choices[Number(select.value)]));
          return select;
        }
        case "toggle": {
          const box = el("input", Object.assign({ type: "checkbox" }, attrs));
          box.checked = !!value;
          box.addEventListener("change", () => set(box.checked));
          return box;
        }
        case "int":
        case "seed":
        case "float":
        case "slider": {
          const integer = spec.widget !== "float" && spec.widget !== "slider";
          const input = el(
            "input",
            Object.assign({ type: "number", step: integer ? "1" : String((spec.ui && spec.ui.step) || "any"), min: spec.min ?? undefined, max: spec.max ?? undefined }, attrs)
          );
          input.value = value === undefined || value === null ? "" : String(value);
          if (!spec.has_default) input.placeholder = "required";
          input.addEventListener("change", () => {
            const text = input.value.trim();
            if (text === "") return set(undefined);
            const number = Number(text);
            if (!Number.isFinite(number) || (integer && !Number.isInteger(number))) {
              errorEl.textContent = integer ? "expected a whole number" : "expected a number";
              errorEl.dataset.kind = "parse";
              return;
            }
            set(number);
          });
          if (spec.widget !== "seed") return input;
          const dice = el("button", {
            class: "df-btn df-small",
            title: "a new random seed",
            "data-testid": "df-seed-random",
            onclick: () => {
              const lo = Math.max(0, spec.min ?? 0);
              const hi = Math.min(spec.max ?? 2 ** 32 - 1, 2 ** 32 - 1);
              const seed = lo + Math.floor(Math.random() * (hi - lo + 1));
              input.value = String(seed);
              set(seed);
            },
          }, "random");
          return el("div", { class: "df-row" }, input, dice);
        }
        case "multiline": {
          const area = el("textarea", Object.assign({ rows: "3" }, attrs));
          area.value = value ?? "";
          area.addEventListener("change", () => set(area.value));
          return area;
        }
        case "path": {
          const listId = `df-paths-${Math.random().toString(36).slice(2)}`;
          const input = el("input", Object.assign({ type: "text", list: listId, placeholder: "a file under the allowed folders" }, attrs));
          const datalist = el("datalist", { id: listId });
          input.value = value ?? "";
          let timer = null;
          const suggest = async () => {
            const options = await this.call("df_paths", input.value);
            datalist.innerHTML = "";
            for (const option of options || []) datalist.appendChild(el("option", { value: option }));
          };
          input.addEventListener("input", () => {
            clearTimeout(timer);
            timer = setTimeout(suggest, 200);
          });
          input.addEventListener("focus", suggest);
          input.addEventListener("change", () => set(input.value === "" && spec.has_default ? undefined : input.value));
          const roots = (this.catalog.roots || []).join(", ");
          return el("div", { class: "df-path" }, input, datalist, el("div", { class: "df-field-desc", text: roots ? `readable: ${roots}` : "" }));
        }
        default: {
          const input = el("input", Object.assign({ type: "text" }, attrs));
          input.value = value ?? "";
          if (!spec.has_default) input.placeholder = "required";
          input.addEventListener("change", () => set(input.value));
          return input;
        }
      }
    }

    /* --- save and open -------------------------------------------------------------------- */

    async save() {
      this.syncNow();
      const result = await this.call("df_save", this.toGraph());
      if (!result) return this.toast("The server did not answer.", "error");
      if (!result.ok) return this.toast(result.error, "error");
      const blob = new Blob([result.yaml], { type: "application/x-yaml" });
      const url = URL.createObjectURL(blob);
      const a = el("a", { href: url, download: result.filename });
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      const n = (result.problems || []).length;
      this.setMessage(n ? `saved ${result.filename} (${n} problem${n > 1 ? "s" : ""} left to fix before it runs)` : `saved ${result.filename}`, n ? "warn" : "ok");
    }

    async openFile(file) {
      const buffer = await file.arrayBuffer();
      this.setMessage(`opening ${file.name}…`);
      const result = await this.call("df_open", { name: file.name, data: toBase64(buffer) });
      if (!result) return this.toast("The server did not answer.", "error");
      if (!result.ok) {
        this.setMessage(`Not opened — the canvas is unchanged. ${result.error}`, "error");
        this.toast(result.error, "error");
        this.root.dataset.lastOpenError = result.error;
        return;
      }
      this.loadGraph(result.graph);
      const n = (result.problems || []).length;
      this.setMessage(`opened ${file.name}${n ? ` — ${n} problem${n > 1 ? "s" : ""} marked on the nodes` : ""}`, n ? "warn" : "ok");
      if (result.warnings && result.warnings.length) this.toast(result.warnings.join(" "), "warn");
    }

    onDrop(e) {
      e.preventDefault();
      this.stage.classList.remove("df-dropping");
      const type = e.dataTransfer.getData("application/x-dagfusion-node");
      if (type) {
        const pos = this.lgc.convertEventToCanvasOffset(e);
        this.addNode(type, [Math.round(pos[0]), Math.round(pos[1])]);
        return;
      }
      const file = e.dataTransfer.files && e.dataTransfer.files[0];
      if (file) this.openFile(file);
    }

    /* --- running ------------------------------------------------------------------------- */

    async run() {
      this.syncNow();
      this.runButton.disabled = true;
      try {
        const result = await this.call("df_submit", this.toGraph());
        if (!result) return this.toast("The server did not answer.", "error");
        if (!result.ok) {
          this.showProblems(result.problems || [], []);
          this.setMessage(`Not run: ${result.error}`, "error");
          this.toast("Fix the problems marked on the nodes before running.", "error");
          return;
        }
        this.follow(result.run.id);
        const where = result.run.position && result.run.position > 1 ? ` (queued, ${result.run.position - 1} ahead)` : "";
        this.setMessage(`run #${result.run.number} submitted${where}`);
      } finally {
        this.runButton.disabled = false;
      }
    }

    follow(runId) {
      this.followed = runId;
      this.previewSince = 0;
      this.previews = [];
      this.previewsEl.innerHTML = "";
      for (const node of this.graph._nodes) {
        node.dfStatus = null;
        node.dfProgress = null;
        node.dfError = null;
        node.dfPreview = null;
        node.size = node.computeSize();
      }
      this.lgc.setDirty(true, true);
      this.pollSoon(0);
    }

    clearRunState() {
      this.followed = null;
      this.previewSince = 0;
      this.previews = [];
      if (this.previewsEl) this.previewsEl.innerHTML = "";
      this.cancelButton.disabled = true;
    }

    async cancel(runId) {
      const id = runId || this.followed;
      if (!id) return;
      const result = await this.call("df_cancel", id);
      if (result && result.ok) this.setMessage(`cancelling run #${result.run.number}…`);
      this.pollSoon(0);
    }

    pollSoon(delay) {
      clearTimeout(this.pollTimer);
      this.pollTimer = setTimeout(() => this.poll(), delay);
    }

    async poll() {
      let next = 1500;
      try {
        const result = await this.call("df_poll", { run: this.followed, since: this.previewSince });
        if (result) {
          this.queue = result.queue || [];
          this.renderQueue();
          if (result.run && result.run.id === this.followed) {
            this.applyRun(result.run);
            if (RUN_ACTIVE[result.run.status]) next = 250;
          }
        }
      } finally {
        this.pollSoon(next);
      }
    }

    applyRun(run) {
      for (const node of this.graph._nodes) {
        const status = run.nodes[node.dfId];
        node.dfStatus = status && status !== "idle" ? status : null;
        node.dfProgress = run.progress[node.dfId] || null;
        node.dfError = run.errors[node.dfId] || null;
      }
      for (const preview of run.previews || []) {
        this.previewSince = Math.max(this.previewSince, preview.index + 1);
        this.addPreview(preview);
      }
      const active = !!RUN_ACTIVE[run.status];
      this.cancelButton.disabled = !active;
      this.root.dataset.runStatus = run.status;
      this.root.dataset.runId = run.id;
      let text = `run #${run.number}: ${run.status}`;
      if (run.status === "queued" && run.position) text += ` (${run.position - 1} ahead)`;
      if (run.points > 1) text += ` — point ${run.point}/${run.points}`;
      if (run.node && run.status === "running") {
        const p = run.progress[run.node];
        text += ` — ${run.node}${p && p.total ? ` ${p.step}/${p.total}` : ""}`;
      }
      if (run.message && !active) text += ` — ${run.message}`;
      else if (run.message === "cancelling…") text += " — cancelling…";
      const kind = { done: "ok", failed: "error", error: "error", invalid: "error", cancelled: "warn" }[run.status] || "";
      this.setMessage(text, kind);
      if (run.problems && run.problems.length) this.showProblems(run.problems, []);
      this.lgc.setDirty(true, true);
    }

    addPreview(preview) {
      const node = this.nodeById(preview.node);
      const img = new Image();
      img.onload = () => {
        if (node) {
          node.dfPreview = img;
          const size = node.computeSize();
          node.size[1] = size[1];
          this.lgc.setDirty(true, true);
        }
      };
      img.src = preview.url;
      img.alt = `${preview.node}: ${preview.label}`;
      const figure = el(
        "figure",
        { class: "df-preview", "data-testid": "df-preview", dataset: { node: preview.node, index: String(preview.index), kind: preview.kind } },
        img.cloneNode(),
        el("figcaption", { text: `${preview.node}${preview.label ? " — " + preview.label : ""}` })
      );
      figure.querySelector("img").src = preview.url;
      this.previewsEl.prepend(figure);
      while (this.previewsEl.children.length > 24) this.previewsEl.lastChild.remove();
    }

    renderQueue() {
      const box = this.queueEl;
      box.innerHTML = "";
      if (!this.queue.length) {
        box.appendChild(el("div", { class: "df-empty", text: "No runs yet." }));
        return;
      }
      for (const run of this.queue.slice(0, 20)) {
        let detail = "";
        if (run.status === "queued" && run.position) detail = `${run.position - 1} ahead`;
        else if (run.status === "running") detail = `${run.done}/${run.planned} nodes${run.node ? " · " + run.node : ""}`;
        else if (run.seconds !== null && run.seconds !== undefined) detail = `${run.seconds.toFixed(2)}s`;
        box.appendChild(
          el(
            "div",
            {
              class: `df-run df-run-${run.status}${run.id === this.followed ? " df-followed" : ""}`,
              "data-testid": "df-run-entry",
              dataset: { run: run.id, status: run.status, number: String(run.number) },
              title: run.message || "",
              onclick: () => {
                if (run.id !== this.followed) this.follow(run.id);
              },
            },
            el("span", { class: "df-pill", text: run.status }),
            el("span", { class: "df-run-name", text: `#${run.number} ${run.name}` }),
            el("small", { text: detail }),
            RUN_ACTIVE[run.status]
              ? el("button", {
                  class: "df-btn df-small",
                  title: "cancel this run",
                  "data-testid": "df-run-cancel",
                  onclick: (e) => {
                    e.stopPropagation();
                    this.cancel(run.id);
                  },
                }, "✕")
              : null
          )
        );
      }
    }

    /* --- messages --------------------------------------------------------------------------- */

    setMessage(text, kind) {
      if (!this.messageEl) return;
      this.messageEl.textContent = text;
      this.messageEl.className = `df-message${kind ? " df-" + kind : ""}`;
    }

    toast(text, kind) {
      const box = this.toastEl;
      box.textContent = text;
      box.className = `df-toast df-show${kind ? " df-" + kind : ""}`;
      clearTimeout(this.toastTimer);
      this.toastTimer = setTimeout(() => (box.className = "df-toast"), 6000);
    }

    /* --- helpers for tests and scripts ------------------------------------------------------ */

    nodeIds() {
      return this.toGraph().nodes.map((n) => n.id);
    }

    slotClientPos(id, kind, name) {
      const node = this.nodeById(id);
      if (!node) return null;
      const input = kind === "in";
      const index = input ? node.inputSlot(name) : node.outputSlot(name);
      if (index < 0) return null;
      const pos = node.getConnectionPos(input, index);
      const canvasPos = this.lgc.ds.convertOffsetToCanvas(pos);
      const rect = this.canvasEl.getBoundingClientRect();
      return [rect.left + canvasPos[0], rect.top + canvasPos[1]];
    }

    nodeClientPos(id) {
      const node = this.nodeById(id);
      if (!node) return null;
      const canvasPos = this.lgc.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] - TITLE_H() / 2]);
      const rect = this.canvasEl.getBoundingClientRect();
      return [rect.left + canvasPos[0], rect.top + canvasPos[1]];
    }

    nodeState(id) {
      const node = this.nodeById(id);
      if (!node) return null;
      return {
        id: node.dfId,
        type: node.dfType,
        status: node.dfStatus,
        progress: node.dfProgress,
        problems: node.dfProblems.map((p) => p.message),
        error: node.dfError,
        preview: !!(node.dfPreview && node.dfPreview.naturalWidth),
        inputs: Object.assign({}, node.dfInputs),
        linked: (node.inputs || []).filter((s) => s.link != null).map((s) => s.name),
      };
    }
  }

  window.DagfusionCanvas = {
    CanvasApp,
    apps: [],
    get app() {
      return this.apps[this.apps.length - 1] || null;
    },
    mount(element, props, server, watch) {
      const root = element.querySelector(".dagfusion-canvas-root") || element;
      const app = new CanvasApp(root, props, server, watch);
      this.apps.push(app);
      app.start().catch((err) => {
        console.error("dagfusion canvas failed to start", err);
        root.dataset.error = String(err && err.message ? err.message : err);
      });
      return app;
    },
  };
})();
