/* dagfusion canvas — the palette of node types (grouped, searchable) and the search box opened on the canvas.
 *
 * Methods of CanvasApp (see canvas.js), loaded after canvas.js.
 */
(function () {
  "use strict";

  const { el } = window.DagfusionCanvas.util;

  window.DagfusionCanvas.mixin({
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
    },

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
    },

    /* --- the search box (double-click the canvas, or release a link on it) ---------------- */

    /* Entries matching every word of `query`, best first: a title that starts with a word,
     * then one that holds it, then the type id, the category, the description. */
    rankEntries(query, entries) {
      const words = String(query || "").toLowerCase().split(/\s+/).filter(Boolean);
      const scored = [];
      for (const entry of entries) {
        const title = entry.title.toLowerCase();
        const type = entry.type.toLowerCase();
        const category = (entry.category || "").toLowerCase();
        const text = `${entry.summary || ""} ${entry.description || ""}`.toLowerCase();
        let score = 0;
        let all = true;
        for (const word of words) {
          let s = 0;
          if (title === word) s = 200;
          else if (title.startsWith(word)) s = 100;
          else if (title.includes(word)) s = 60;
          else if (type.includes(word)) s = 30;
          else if (category.includes(word)) s = 20;
          else if (text.includes(word)) s = 10;
          if (!s) {
            all = false;
            break;
          }
          score += s;
        }
        if (all) scored.push([score, entry]);
      }
      scored.sort((a, b) => b[0] - a[0] || a[1].title.localeCompare(b[1].title));
      return scored.map(([, entry]) => entry);
    },

    openSearch(event, options) {
      this.closeSearch();
      const opts = options || {};
      const rect = this.stage.getBoundingClientRect();
      const clientX = event && event.clientX !== undefined ? event.clientX : rect.left + rect.width / 2;
      const clientY = event && event.clientY !== undefined ? event.clientY : rect.top + rect.height / 3;
      const where = event && event.canvasX !== undefined ? [event.canvasX, event.canvasY] : this.lgc.ds.convertCanvasToOffset([clientX - rect.left, clientY - rect.top]);
      // Released from an output: nodes with an input that takes it; from an input: nodes with
      // an output it takes.
      let candidates = this.catalog.nodes;
      let filter = "";
      const from = opts.node_from && opts.slot_from;
      const to = !from && opts.node_to && opts.slot_from;
      if (from) {
        candidates = candidates.filter((e) => e.inputs.some((i) => this.accepts(i.type, opts.slot_from.type)));
        filter = `nodes taking ${opts.slot_from.type}`;
      } else if (to) {
        candidates = candidates.filter((e) => e.outputs.some((o) => this.accepts(opts.slot_from.type, o.type)));
        filter = `nodes giving ${opts.slot_from.type}`;
      }
      const input = el("input", { type: "search", class: "df-searchbox-input", "data-testid": "df-searchbox-input", placeholder: filter ? `Search ${filter}…` : "Search nodes by name or description…" });
      const list = el("div", { class: "df-searchbox-list", "data-testid": "df-searchbox-list" });
      const box = el("div", { class: "df-searchbox", "data-testid": "df-searchbox", dataset: { filter } }, input, list);
      box.style.left = `${Math.max(4, Math.min(clientX - rect.left, rect.width - 340))}px`;
      box.style.top = `${Math.max(4, Math.min(clientY - rect.top, rect.height - 320))}px`;
      let shown = [];
      let active = 0;
      const choose = (entry) => {
        this.closeSearch();
        const node = this.createNode(entry.type, { pos: [Math.round(where[0]), Math.round(where[1])] });
        if (!node) return;
        if (from) {
          const slot = opts.node_from.outputs.indexOf(opts.slot_from);
          if (slot >= 0) opts.node_from.connectByType(slot, node, opts.slot_from.type);
        } else if (to) {
          const slot = opts.node_to.inputs.indexOf(opts.slot_from);
          if (slot >= 0) opts.node_to.connectByTypeOutput(slot, node, opts.slot_from.type);
        }
        this.select(node);
        this.scheduleSync();
      };
      const render = () => {
        shown = this.rankEntries(input.value, candidates).slice(0, 40);
        active = Math.min(active, Math.max(0, shown.length - 1));
        list.innerHTML = "";
        if (!shown.length) list.appendChild(el("div", { class: "df-empty", text: "No node type matches." }));
        shown.forEach((entry, i) => {
          list.appendChild(
            el(
              "div",
              {
                class: `df-searchbox-item${i === active ? " df-active" : ""}`,
                "data-testid": "df-searchbox-item",
                dataset: { type: entry.type },
                title: entry.description || "",
                onmousedown: (e) => {
                  e.preventDefault();
                  choose(entry);
                },
              },
              el("div", { class: "df-item-title" }, el("span", { text: entry.title }), el("small", { text: entry.type })),
              el("div", { class: "df-item-desc", text: entry.summary || "" })
            )
          );
        });
      };
      input.addEventListener("input", () => {
        active = 0;
        render();
      });
      input.addEventListener("keydown", (e) => {
        if (e.key === "ArrowDown" || e.key === "ArrowUp") {
          e.preventDefault();
          active = Math.max(0, Math.min(shown.length - 1, active + (e.key === "ArrowDown" ? 1 : -1)));
          render();
        } else if (e.key === "Enter") {
          e.preventDefault();
          if (shown[active]) choose(shown[active]);
        } else if (e.key === "Escape") {
          e.preventDefault();
          this.closeSearch();
        }
      });
      this.searchBox = box;
      this.stage.appendChild(box);
      render();
      setTimeout(() => input.focus(), 0);
      this.searchOutside = (e) => {
        if (this.searchBox && !this.searchBox.contains(e.target)) this.closeSearch();
      };
      setTimeout(() => document.addEventListener("pointerdown", this.searchOutside, true), 0);
    },

    closeSearch() {
      if (this.searchOutside) document.removeEventListener("pointerdown", this.searchOutside, true);
      this.searchOutside = null;
      if (this.searchBox) this.searchBox.remove();
      this.searchBox = null;
    },
  });
})();
