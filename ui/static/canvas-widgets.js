/* dagfusion canvas — the inspector: the selected node's id, description and a widget for every input, generated
 * from the input's specification.
 *
 * Methods of CanvasApp (see canvas.js), loaded after canvas.js.
 */
(function () {
  "use strict";

  const { el, short } = window.DagfusionCanvas.util;

  window.DagfusionCanvas.mixin({
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
    },

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
    },

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
    },

    boundProblem(spec, value) {
      if (spec.choices && spec.choices.length && !spec.choices.some((c) => JSON.stringify(c) === JSON.stringify(value))) return `expected one of ${JSON.stringify(spec.choices)}`;
      if (typeof value === "number") {
        if (!Number.isFinite(value)) return "expected a number";
        if (spec.min !== null && spec.min !== undefined && value < spec.min) return `expected a value >= ${spec.min}, got ${value}`;
        if (spec.max !== null && spec.max !== undefined && value > spec.max) return `expected a value <= ${spec.max}, got ${value}`;
      }
      return null;
    },

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
    },
  });
})();
