/* dagfusion canvas — node rendering: the litegraph node class of each node type (sockets, widgets on the node,
 * sizes, connection checks) and what is drawn on a node (status, progress, problems, picture).
 *
 * Methods of CanvasApp (see canvas.js), loaded after canvas.js.
 */
(function () {
  "use strict";

  const { PLACEHOLDER, PREVIEW_BOX, TITLE_H, SLOT_H, WIDGET_H, WIDGET_STEP, STATUS_COLORS, STATUS_ICONS, snake, short, wrapText } = window.DagfusionCanvas.util;

  window.DagfusionCanvas.mixin({
    /* The litegraph type of a placeholder for graph node `gn` of a type this server does not
     * know: red, with an input for each of its inputs and an output for each output it feeds
     * (from `links`), so its links and constants are kept and saved back as they were. */
    placeholderType(gn, links) {
      const inputs = Object.keys(gn.inputs || {});
      for (const link of links) if (link.to[0] === gn.id && inputs.indexOf(link.to[1]) === -1) inputs.push(link.to[1]);
      const order = (gn.order || []).filter((n) => inputs.indexOf(n) !== -1);
      const names = order.concat(inputs.filter((n) => order.indexOf(n) === -1));
      const outputs = [];
      for (const link of links) if (link.from[0] === gn.id && outputs.indexOf(link.from[1]) === -1) outputs.push(link.from[1]);
      const entry = {
        type: gn.type,
        title: gn.type.split(".").pop(),
        version: gn.version || "?",
        category: "",
        summary: "",
        description: `Node type ${gn.type} is not registered on this server (a missing plugin?). The node is kept as it is — its inputs and links — and saved back unchanged, but the workflow cannot run until the type is installed.`,
        plugin: null,
        pure: true,
        output_node: false,
        missing: true,
        inputs: names.map((name) => ({ name, type: "*", required: false, optional: true, has_default: false, default: null, widget: null, link_only: true, description: "" })),
        outputs: outputs.map((name) => ({ name, type: "*", description: "" })),
      };
      const key = `${PLACEHOLDER}/${this.placeholderCount = (this.placeholderCount || 0) + 1}`;
      const Cls = this.nodeClass(entry);
      LiteGraph.registerNodeType(key, Cls);
      LiteGraph.registered_node_types[key].skip_list = true;
      LiteGraph.registered_node_types[key].category = "";
      return { key, entry };
    },

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
        this.title = entry.missing ? `⚠ not installed: ${entry.type}` : base;
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
        // A node that saves or shows pictures keeps a fixed box for them: it never grows with
        // its picture (which is scaled into the box), so it cannot cover the nodes below it.
        if (entry.output_node && !entry.missing) height += 8 + PREVIEW_BOX;
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
        o.df = { id: this.dfId, inputs: JSON.parse(JSON.stringify(this.dfInputs)), order: this.dfOrder.slice(), ui: JSON.parse(JSON.stringify(this.dfUi)), version: this.dfVersion, bypass: !!this.dfBypass };
      };

      proto.onConfigure = function (o) {
        if (o && o.df) {
          this.dfId = o.df.id || null;
          this.dfInputs = o.df.inputs || {};
          this.dfOrder = o.df.order || this.dfOrder;
          this.dfUi = o.df.ui || {};
          this.dfVersion = o.df.version || null;
          this.dfBypass = !!o.df.bypass;
          this.refreshWidgets();
        }
      };

      // Collapsing (the title bar's toggle, the menu's Collapse) is an edit: saved and undoable.
      proto.collapse = function (force) {
        LGraphNode.prototype.collapse.call(this, force);
        if (!app.loading) app.scheduleSync({ layout: true });
      };

      proto.getExtraMenuOptions = function () {
        return [
          { content: "Show in inspector", callback: () => app.select(this) },
          { content: this.dfBypass ? "Stop bypassing (Ctrl+B)" : "Bypass (Ctrl+B)", callback: () => app.toggleBypass([this]) },
        ];
      };

      proto.onDrawForeground = function (ctx) {
        app.drawNodeDecorations(this, ctx);
      };

      return DagfusionNode;
    },

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
        let top, maxW, maxH, left;
        if (node.dfEntry.output_node) {
          // Scaled into the node's fixed picture box.
          top = h - PREVIEW_BOX - 4;
          maxW = w - 20;
          maxH = PREVIEW_BOX;
          left = null;
        } else {
          // Other nodes (a sampler's steps): a small thumbnail beside the title, outside the node.
          maxW = maxH = 56;
          top = -titleH - 2 - 56 - 22;
          left = w - 56;
        }
        const scale = Math.min(maxW / img.naturalWidth, maxH / img.naturalHeight);
        const dw = img.naturalWidth * scale;
        const dh = img.naturalHeight * scale;
        ctx.imageSmoothingEnabled = scale < 1;
        ctx.drawImage(img, left === null ? (w - dw) / 2 : left + (maxW - dw), left === null ? top + (maxH - dh) / 2 : top + (maxH - dh), dw, dh);
      }
      if (node.dfBypass) {
        ctx.fillStyle = "rgba(171, 71, 188, 0.28)";
        ctx.beginPath();
        ctx.roundRect(0, -titleH, w, h + titleH, 6);
        ctx.fill();
        ctx.font = "bold 12px Arial";
        ctx.textAlign = "right";
        ctx.fillStyle = "#e1bee7";
        ctx.fillText("bypassed", w - 8, -titleH - 7);
      }
      if (node.dfEntry.missing) {
        ctx.strokeStyle = "#ff1744";
        ctx.lineWidth = 3;
        ctx.beginPath();
        ctx.roundRect(-3, -titleH - 3, w + 6, h + titleH + 6, 8);
        ctx.stroke();
      }
      ctx.restore();
    },
  });
})();
