/* dagfusion canvas: a litegraph.js editor for dagfusion workflows, mounted by the Gradio app.
 *
 * dagfusion's own code (no third-party code here). litegraph.js is loaded before this file
 * from the package's static/vendor folder, which the build step fills from the npm registry
 * at the version pinned in ui/package-lock.json.
 *
 * This file holds the shared helpers and the CanvasApp class's core (start-up, the page's layout,
 * litegraph set-up, node bookkeeping, checking, messages); the other canvas-*.js files add its
 * other methods, one job each (palette, nodes, widgets, io, runs, undo), and are loaded after
 * it in that order (see dagfusion/ui/app.py).
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
  /* litegraph type of the nodes drawn for node types this server does not know. */
  const PLACEHOLDER = "dagfusion/placeholder";
  /* Fixed size of a node's picture (the node does not grow with it). */
  const PREVIEW_BOX = 160;

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
      this.lastRun = null; // the followed run's last state
      this.runText = null; // the status line last written for it
      this.pinned = false; // a message from the user's last action: kept until the next action
      this.previewSince = 0;
      this.previews = [];
      this.queue = [];
      this.results = {}; // run id -> its results (pictures, texts), once loaded
      this.openRun = null; // run id whose results the history shows
      this.lastSent = null;
      this.loading = false;
      this.checkSeq = 0;
      this.syncTimer = null;
      this.pollTimer = null;
      this.addCount = 0;
      this.toastTimer = null;
      this.refusals = [];
      this.seq = 0;
      this.timings = { created: performance.now() };
    }

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
      this.bindKeys();
      this.buildPalette();
      const initial = this.props.value;
      // Edits survive a page reload: they are kept in the browser under a key naming the
      // graph the server opened with (a server started on another file starts afresh).
      this.storageKey = "dagfusion.canvas." + hashText(JSON.stringify(initial || null));
      const followed = this.rememberedRun(); // (read before loading a graph forgets it)
      const kept = this.restore();
      if (kept) {
        this.loadGraph(kept, { send: true });
        this.setMessage("restored the canvas as you left it (Clear or Open… to start over)", "ok", { pin: true });
      } else {
        if (initial && typeof initial === "object" && Array.isArray(initial.nodes)) {
          this.loadGraph(initial, { send: false });
        } else {
          this.meta = { metadata: {}, outputs: null, sweep: [], ui: {} };
          this.scheduleSync();
        }
        if (this.props.notice) this.setMessage(this.props.notice, "warn", { pin: true });
        else this.setMessage("ready");
      }
      this.resetHistory(JSON.stringify(this.toGraph()));
      this.watch("value", () => this.onValueFromServer());
      // The run followed before a reload is followed again (its statuses come back on the nodes).
      if (followed) this.follow(followed, { keepMessage: true });
      this.pollSoon(0);
      this.timings.ready = performance.now();
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
      this.runButton = el("button", { class: "df-btn df-primary", "data-testid": "df-run", title: "Validate and queue a run (Ctrl+Enter)", onclick: () => this.run() }, "▶ Run");
      this.cancelButton = el("button", { class: "df-btn", "data-testid": "df-cancel", title: "Cancel the run shown on the canvas", disabled: true, onclick: () => this.cancel() }, "■ Cancel");
      this.undoButton = el("button", { class: "df-btn", "data-testid": "df-undo", title: "Undo (Ctrl+Z)", disabled: true, onclick: () => this.undo() }, "↶");
      this.redoButton = el("button", { class: "df-btn", "data-testid": "df-redo", title: "Redo (Ctrl+Shift+Z)", disabled: true, onclick: () => this.redo() }, "↷");
      this.messageEl = el("div", { class: "df-message", "data-testid": "df-message", role: "status" });
      const toolbar = el(
        "div",
        { class: "df-toolbar" },
        this.runButton,
        this.cancelButton,
        el("span", { class: "df-sep" }),
        el("button", { class: "df-btn", "data-testid": "df-open", title: "Open a workflow YAML or a dagfusion PNG (Ctrl+O)", onclick: () => this.openDialog() }, "Open…"),
        el("button", { class: "df-btn", "data-testid": "df-save", title: "Download the workflow as YAML, the CLI's format (Ctrl+S)", onclick: () => this.save() }, "Save YAML"),
        el("button", { class: "df-btn", "data-testid": "df-clear", title: "Remove every node", onclick: () => this.clear() }, "Clear"),
        el("span", { class: "df-sep" }),
        this.undoButton,
        this.redoButton,
        el("button", { class: "df-btn", "data-testid": "df-fit", title: "Show every node", onclick: () => this.fitView() }, "Fit"),
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
      this.problemsTitle = el("h3", { text: "Problems" });
      this.queueEl = el("div", { class: "df-queue", "data-testid": "df-queue" });
      this.resultsEl = el("div", { class: "df-results", "data-testid": "df-results" });
      this.previewsEl = el("div", { class: "df-previews", "data-testid": "df-previews" });
      // Fixed places, each scrolling on its own: the inspector on top, the problems under it,
      // the runs (queue and history, with the open run's results), and a strip of live previews.
      const side = el(
        "aside",
        { class: "df-side" },
        el("section", { class: "df-pane df-pane-node", "data-testid": "df-pane-node" }, el("h3", { text: "Node" }), this.inspectorEl),
        el("section", { class: "df-pane df-pane-problems", "data-testid": "df-pane-problems" }, this.problemsTitle, this.problemsEl),
        el("section", { class: "df-pane df-pane-runs", "data-testid": "df-pane-runs" }, el("h3", { text: "Runs" }), this.queueEl, this.resultsEl),
        el("section", { class: "df-pane df-pane-previews", "data-testid": "df-pane-previews" }, el("h3", { text: "Previews" }), this.previewsEl)
      );
      this.lightbox = el("div", { class: "df-lightbox", "data-testid": "df-lightbox", hidden: true, onclick: () => (this.lightbox.hidden = true) });
      this.root.appendChild(el("div", { class: "df-app" }, toolbar, el("div", { class: "df-body" }, palette, this.stage, side), this.lightbox));
      this.renderInspector();
      this.renderProblems();
      this.renderQueue();
      // A message about the user's last action stays until their next action.
      const unpin = () => (this.pinned = false);
      this.root.addEventListener("pointerdown", unpin, true);
      this.root.addEventListener("keydown", unpin, true);

      this.stage.addEventListener("dragover", (e) => {
        e.preventDefault();
        const files = e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
        this.stage.classList.toggle("df-dropping", !!files);
      });
      this.stage.addEventListener("dragleave", () => this.stage.classList.remove("df-dropping"));
      this.stage.addEventListener("drop", (e) => this.onDrop(e));
    }

    setupLiteGraph() {
      const app = this;
      // A link released on the empty canvas opens the search box, filtered to nodes that fit it.
      LiteGraph.release_link_on_empty_shows_menu = true;
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
        // litegraph drops titles, socket names and widgets below 60 % zoom; a fitted workflow is
        // often smaller than that, so nodes are drawn in full down to 25 % (the canvas is already
        // scaled: only litegraph's quality switch reads this value while a node is drawn).
        const ds = this.ds;
        const real = ds.scale;
        if (real < 0.6 && real >= 0.25) ds.scale = 0.6;
        try {
          return drawNode.call(this, node, ctx);
        } finally {
          ds.scale = real;
          drawingInputsOf = null;
        }
      };
      // The search box is the canvas's own (titles and descriptions, ranked; see canvas-palette.js).
      LGraphCanvas.prototype.showSearchBox = function (event, options) {
        app.openSearch(event, options || {});
        return null;
      };
      LGraphCanvas.prototype.showConnectionMenu = function (options) {
        const o = options || {};
        if (o.nodeFrom) app.openSearch(o.e, { node_from: o.nodeFrom, slot_from: o.slotFrom });
        else if (o.nodeTo) app.openSearch(o.e, { node_to: o.nodeTo, slot_from: o.slotTo });
      };
      for (const entry of this.catalog.nodes) {
        LiteGraph.registerNodeType(entry.type, this.nodeClass(entry));
        // "Add Node" in the context menu lists node types by their registry category.
        LiteGraph.registered_node_types[entry.type].category = entry.category || "other";
      }
      this.graph = new LGraph();
      const lgc = (this.lgc = new LGraphCanvas(this.canvasEl, this.graph));
      lgc.show_info = false;
      lgc.render_canvas_border = false;
      lgc.allow_searchbox = true;
      // Zooming out far enough to see a large workflow whole.
      lgc.ds.min_scale = 0.1;
      lgc.ds.max_scale = 4;
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
      // Groups (added, moved, renamed or removed through litegraph's menus) have no callbacks:
      // the graph is compared after every pointer gesture instead (a no-op when nothing changed).
      document.addEventListener("pointerup", () => {
        if (this.graph && !this.loading && this.root.isConnected) this.scheduleSync({ layout: true });
      });
      const resize = () => {
        const rect = this.stage.getBoundingClientRect();
        if (rect.width > 0 && rect.height > 0) lgc.resize(Math.floor(rect.width), Math.floor(rect.height));
      };
      this.canvasEl.addEventListener("pointermove", () => (this.lastPointerOnCanvas = true));
      this.canvasEl.addEventListener("pointerleave", () => (this.lastPointerOnCanvas = false));
      new ResizeObserver(resize).observe(this.stage);
      resize();
      this.graph.start();
    }

    accepts(expected, got) {
      if (!this.catalog) return true;
      if (expected === "*" || got === "*") return true; // a placeholder's sockets take anything
      const list = this.catalog.accepts[expected];
      if (!list) return expected === got;
      return list.indexOf(got) !== -1;
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
      this.seedNode(node, entry, options);
      this.graph.add(node);
      return node;
    }

    /* A node's dagfusion state from a graph node (see dagfusion/ui/graph.py), before it is added. */
    seedNode(node, entry, options) {
      node.dfId = options.id || this.freshId(entry);
      node.dfInputs = Object.assign({}, options.inputs || {});
      if (options.order && options.order.length) {
        const rest = entry.inputs.map((i) => i.name).filter((n) => options.order.indexOf(n) === -1);
        node.dfOrder = options.order.concat(rest);
      }
      node.dfUi = this.applyLook(node, Object.assign({}, options.ui || {}));
      node.dfVersion = options.version || null;
      node.dfBypass = options.bypass === true;
      node.pos = options.pos ? [options.pos[0], options.pos[1]] : [40, 40];
      node.updateTitle();
      node.refreshWidgets();
      node.size = node.computeSize();
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
      if (this.recordEdit) this.recordEdit(text);
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

    setMessage(text, kind, opts) {
      if (!this.messageEl) return;
      this.messageEl.textContent = text;
      this.messageEl.className = `df-message${kind ? " df-" + kind : ""}`;
      this.messageEl.title = text;
      // The followed run writes its state only while no message of the user's is shown.
      this.pinned = !!(opts && opts.pin);
    }

    toast(text, kind) {
      const box = this.toastEl;
      box.textContent = text;
      box.className = `df-toast df-show${kind ? " df-" + kind : ""}`;
      clearTimeout(this.toastTimer);
      this.toastTimer = setTimeout(() => (box.className = "df-toast"), 6000);
    }

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

    /* The node's box on the page (title bar included): [left, top, right, bottom]. */
    nodeClientRect(id) {
      const node = this.nodeById(id);
      if (!node) return null;
      const a = this.lgc.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - TITLE_H()]);
      const b = this.lgc.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
      const rect = this.canvasEl.getBoundingClientRect();
      return [rect.left + a[0], rect.top + a[1], rect.left + b[0], rect.top + b[1]];
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
        size: [Math.round(node.size[0]), Math.round(node.size[1])],
        pos: [Math.round(node.pos[0]), Math.round(node.pos[1])],
        bypass: !!node.dfBypass,
        color: node.color || null,
        bgcolor: node.bgcolor || null,
        collapsed: !!(node.flags && node.flags.collapsed),
        placeholder: !!(node.dfEntry && node.dfEntry.missing),
        inputs: Object.assign({}, node.dfInputs),
        linked: (node.inputs || []).filter((s) => s.link != null).map((s) => s.name),
      };
    }
  }

  window.DagfusionCanvas = {
    CanvasApp,
    apps: [],
    /* Shared by the other canvas-*.js files. */
    util: { PLACEHOLDER, PREVIEW_BOX, TITLE_H, SLOT_H, WIDGET_H, WIDGET_STEP, NODE_IDENT, STATUS_COLORS, STATUS_ICONS, RUN_ACTIVE, el, snake, short, wrapText, hashText, toBase64 },
    /* Adds methods to CanvasApp (each canvas-*.js file adds those of its job). */
    mixin(methods) {
      for (const name of Object.getOwnPropertyNames(methods)) {
        Object.defineProperty(CanvasApp.prototype, name, Object.getOwnPropertyDescriptor(methods, name));
      }
    },
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
