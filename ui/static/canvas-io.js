/* dagfusion canvas — the graph: canvas ⇄ dagfusion graph schema, layout and fitting the view, groups, placeholder
 * nodes, clipboard, saving and opening files.
 *
 * Methods of CanvasApp (see canvas.js), loaded after canvas.js.
 */
(function () {
  "use strict";

  const { TITLE_H, el, toBase64 } = window.DagfusionCanvas.util;

  /* A colour a node's `ui` may give (litegraph's palette writes "#rrggbb"). */
  const COLOR_RE = /^(#[0-9a-fA-F]{3,8}|[a-zA-Z]{3,30}|(rgb|hsl)a?\([0-9.,%\s]{1,40}\))$/;
  const isColor = (v) => typeof v === "string" && COLOR_RE.test(v);

  /* litegraph's colour for a new group (not written to the file). */
  const DEFAULT_GROUP_COLOR = () => (LGraphCanvas.node_colors.pale_blue ? LGraphCanvas.node_colors.pale_blue.groupcolor : "#3f789e");

  window.DagfusionCanvas.mixin({
    toGraph(only) {
      const nodes = [];
      const links = [];
      // File order is creation order (litegraph reorders _nodes to draw the selected on top).
      const ordered = this.graph._nodes.filter((n) => n.dfEntry && (!only || only.has(n))).sort((a, b) => a.dfSeq - b.dfSeq);
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
          ui: this.nodeUi(node),
          ...(node.dfBypass ? { bypass: true } : {}),
        });
        for (const slot of node.inputs || []) {
          if (slot.link == null) continue;
          const link = this.graph.links[slot.link];
          const origin = link && this.graph.getNodeById(link.origin_id);
          if (!origin || !origin.dfEntry || (only && !only.has(origin))) continue;
          links.push({ from: [origin.dfId, origin.outputs[link.origin_slot].name], to: [node.dfId, slot.name] });
        }
      }
      const meta = Object.assign({ metadata: {}, outputs: null, sweep: [] }, this.meta || {});
      // Groups live in the workflow's ui section (ui.groups), which the engine ignores.
      const ui = Object.assign({}, meta.ui || {});
      const groups = this.groupsData();
      if (groups.length) ui.groups = groups;
      else delete ui.groups;
      meta.ui = ui;
      return { version: 1, nodes, links, workflow: meta };
    },

    loadGraph(graph, { send = true, keepView = false, keepRun = false } = {}) {
      const placeholders = [];
      this.loading = true;
      this.refusals = [];
      try {
        this.graph.clear();
        this.meta = graph.workflow || { metadata: {}, outputs: null, sweep: [], ui: {} };
        const byId = {};
        for (const gn of graph.nodes || []) {
          if (this.entries[gn.type]) {
            byId[gn.id] = this.createNode(gn.type, gn);
            continue;
          }
          // A type this server does not know: a red placeholder keeping its inputs and links.
          const { key, entry } = this.placeholderType(gn, graph.links || []);
          const node = LiteGraph.createNode(key);
          this.seedNode(node, entry, gn);
          node.color = "#8e1b1b";
          node.bgcolor = "#3b1212";
          this.graph.add(node);
          byId[gn.id] = node;
          placeholders.push(`${gn.id} (${gn.type})`);
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
        this.loadGroups((this.meta.ui && this.meta.ui.groups) || []);
      } finally {
        this.loading = false;
      }
      if (keepRun) {
        if (this.lastRun) this.applyRun(this.lastRun, { quiet: true });
      } else {
        this.clearRunState();
      }
      if (!keepView) this.fitView();
      this.renderInspector();
      if (this.refusals.length) this.toast(`Some parts could not be drawn: ${this.refusals.join("; ")}`, "error");
      else if (placeholders.length && !keepRun) {
        this.toast(`Not installed here, kept as placeholders: ${placeholders.join(", ")}`, "warn");
      }
      if (send) this.syncNow();
      else this.lastSent = JSON.stringify(graph);
      this.checkNow();
    },

    /* A node's look — its colours (title `color`, body `bgcolor`) and whether it is collapsed —
     * is saved in its `ui` mapping beside `pos`, each key only when set. applyLook puts the look
     * from `ui` on the litegraph node and returns the other keys (kept as they were); nodeUi
     * gives them back with the node's look as it is now. A placeholder keeps its colours as read
     * (it is drawn red). */
    applyLook(node, ui) {
      const placeholder = !!(node.dfEntry && node.dfEntry.missing);
      if (!placeholder) {
        for (const key of ["color", "bgcolor"]) {
          if (isColor(ui[key])) {
            node[key] = ui[key];
            delete ui[key];
          }
        }
      }
      if (ui.collapsed === true) {
        node.flags = node.flags || {};
        node.flags.collapsed = true;
        delete ui.collapsed;
      }
      return ui;
    },

    nodeUi(node) {
      const ui = Object.assign({}, node.dfUi);
      if (!(node.dfEntry && node.dfEntry.missing)) {
        if (isColor(node.color)) ui.color = node.color;
        if (isColor(node.bgcolor)) ui.bgcolor = node.bgcolor;
      }
      if (node.flags && node.flags.collapsed) ui.collapsed = true;
      return ui;
    },

    /* Open… and Ctrl+O: the browser's file chooser, then openFile. */
    openDialog() {
      this.fileInput.click();
    },

    /* Arrow keys: move the selected nodes by `steps` grid steps along (dx, dy). */
    nudgeSelection(dx, dy, steps) {
      const nodes = Object.values(this.lgc.selected_nodes || {});
      if (!nodes.length) return false;
      const grid = LiteGraph.CANVAS_GRID_SIZE || 10;
      for (const node of nodes) {
        node.pos[0] += dx * steps * grid;
        node.pos[1] += dy * steps * grid;
      }
      this.lgc.setDirty(true, true);
      this.scheduleSync({ layout: true }); // a burst of presses within 200 ms is one undo step
      return true;
    },

    groupsData() {
      return (this.graph._groups || []).map((g) => {
        const out = { title: String(g.title || "Group"), bounding: Array.from(g._bounding || g.bounding || [0, 0, 140, 80]).map((v) => Math.round(v)) };
        if (g.color && g.color !== DEFAULT_GROUP_COLOR()) out.color = g.color;
        return out;
      });
    },

    loadGroups(groups) {
      if (!Array.isArray(groups)) return;
      for (const data of groups) {
        if (!data || !Array.isArray(data.bounding) || data.bounding.length !== 4) continue;
        const group = new LiteGraph.LGraphGroup(String(data.title || "Group"));
        group.configure({ title: String(data.title || "Group"), bounding: data.bounding.map(Number), color: data.color || group.color });
        this.graph.add(group);
      }
    },

    /* --- clipboard: copied nodes keep the links between them ---------------------------- */

    copySelection() {
      const selected = new Set(Object.values(this.lgc.selected_nodes || {}).filter((n) => n.dfEntry));
      if (!selected.size) return;
      const part = this.toGraph(selected);
      delete part.workflow;
      this.clipboard = part;
      try {
        window.localStorage.setItem("dagfusion.clipboard", JSON.stringify(part));
      } catch (err) {
        /* storage disabled: the copy stays in this page */
      }
      this.setMessage(`copied ${part.nodes.length} node${part.nodes.length === 1 ? "" : "s"}`, "", { pin: true });
    },

    pasteClipboard() {
      let part = this.clipboard;
      try {
        const text = window.localStorage.getItem("dagfusion.clipboard");
        if (text) part = JSON.parse(text);
      } catch (err) {
        /* keep this page's copy */
      }
      if (!part || !Array.isArray(part.nodes) || !part.nodes.length) return;
      // Pasted where the pointer is (else beside the originals), with fresh ids.
      const x0 = Math.min(...part.nodes.map((n) => n.pos[0]));
      const y0 = Math.min(...part.nodes.map((n) => n.pos[1]));
      const mouse = this.lgc.graph_mouse;
      const inside = this.lastPointerOnCanvas && mouse;
      const dx = inside ? mouse[0] - x0 : 40;
      const dy = inside ? mouse[1] - y0 : 40;
      const ids = {};
      const created = [];
      this.loading = true;
      try {
        for (const gn of part.nodes) {
          if (!this.entries[gn.type]) continue;
          const node = this.createNode(gn.type, Object.assign({}, gn, { id: null, pos: [gn.pos[0] + dx, gn.pos[1] + dy] }));
          ids[gn.id] = node;
          created.push(node);
        }
        for (const link of part.links || []) {
          const src = ids[link.from[0]];
          const dst = ids[link.to[0]];
          if (src && dst) src.connect(src.outputSlot(link.from[1]), dst, dst.inputSlot(link.to[1]));
        }
        for (const node of created) node.refreshWidgets();
      } finally {
        this.loading = false;
      }
      this.lgc.deselectAllNodes();
      for (const node of created) this.lgc.selectNode(node, true);
      this.renderInspector();
      this.scheduleSync();
      this.setMessage(`pasted ${created.length} node${created.length === 1 ? "" : "s"}`, "", { pin: true });
    },

    toggleBypass(nodes) {
      const list = (nodes || Object.values(this.lgc.selected_nodes || {})).filter((n) => n.dfEntry && !n.dfEntry.missing);
      if (!list.length) return;
      const on = !list.every((n) => n.dfBypass);
      for (const node of list) node.dfBypass = on;
      this.lgc.setDirty(true, true);
      this.scheduleSync();
      this.setMessage(`${on ? "bypassed" : "no longer bypassing"} ${list.map((n) => n.dfId).join(", ")}`, "", { pin: true });
    },

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
    },

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
      for (const g of this.graph._groups || []) {
        const [gx, gy, gw, gh] = g._bounding;
        x0 = Math.min(x0, gx);
        y0 = Math.min(y0, gy);
        x1 = Math.max(x1, gx + gw);
        y1 = Math.max(y1, gy + gh);
      }
      const rect = this.canvasEl.getBoundingClientRect();
      const width = rect.width || 800;
      const height = rect.height || 600;
      // Every node in view, however far that zooms out (never zoomed in past 1).
      const scale = Math.max(ds.min_scale || 0.1, Math.min(1, (width - 40) / (x1 - x0), (height - 40) / (y1 - y0)));
      ds.scale = scale;
      // Centred in the view.
      ds.offset = [(width / scale - (x1 - x0)) / 2 - x0, (height / scale - (y1 - y0)) / 2 - y0];
      this.lgc.setDirty(true, true);
    },

    onValueFromServer() {
      const value = this.props.value;
      if (!value || typeof value !== "object" || !Array.isArray(value.nodes)) return;
      if (JSON.stringify(value) === this.lastSent) return; // our own edit coming back
      this.loadGraph(value, { send: false });
    },

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
    },

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
    },

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
    },
  });
})();
