/* dagfusion canvas — runs: submitting, following a run (node statuses, progress, previews), the
 * queue and history of runs with each finished run's pictures and text results.
 *
 * Every run is a job of the job store (see dagfusion/ui/jobqueue.py): the history is read back
 * from it, so it survives a page reload and a server restart. The followed run is remembered in
 * the browser and followed again after a reload. Methods of CanvasApp (see canvas.js).
 */
(function () {
  "use strict";

  const { RUN_ACTIVE, el } = window.DagfusionCanvas.util;
  const STATUS_KIND = { done: "ok", failed: "error", error: "error", invalid: "error", cancelled: "warn" };

  function when(seconds) {
    if (!seconds) return "";
    const date = new Date(seconds * 1000);
    const today = new Date().toDateString() === date.toDateString();
    return today ? date.toLocaleTimeString() : date.toLocaleString();
  }

  window.DagfusionCanvas.mixin({
    async run() {
      this.syncNow();
      this.runButton.disabled = true;
      try {
        const result = await this.call("df_submit", this.toGraph());
        if (!result) return this.toast("The server did not answer.", "error");
        if (!result.ok) {
          this.showProblems(result.problems || [], []);
          this.setMessage(`Not run: ${result.error}`, "error", { pin: true });
          this.toast("Fix the problems marked on the nodes before running.", "error");
          return;
        }
        this.follow(result.run.id);
        const where = result.run.position && result.run.position > 1 ? ` (queued, ${result.run.position - 1} ahead)` : "";
        this.setMessage(`run #${result.run.number} submitted${where}`);
        this.runText = null;
      } finally {
        this.runButton.disabled = false;
      }
    },

    runKey() {
      return "dagfusion.followed." + (this.storageKey || "");
    },

    rememberedRun() {
      try {
        return window.localStorage.getItem(this.runKey()) || null;
      } catch (err) {
        return null;
      }
    },

    follow(runId, opts) {
      this.followed = runId;
      this.openRun = runId;
      this.lastRun = null;
      this.runText = null;
      this.previewSince = 0;
      this.previews = [];
      this.previewsEl.innerHTML = "";
      try {
        window.localStorage.setItem(this.runKey(), runId);
      } catch (err) {
        /* storage disabled: a reload then follows nothing */
      }
      for (const node of this.graph._nodes) {
        node.dfStatus = null;
        node.dfProgress = null;
        node.dfError = null;
        node.dfPreview = null;
        node.size = node.computeSize();
      }
      if (!(opts && opts.keepMessage)) this.pinned = false;
      this.lgc.setDirty(true, true);
      this.renderQueue();
      this.pollSoon(0);
    },

    clearRunState() {
      this.followed = null;
      this.lastRun = null;
      this.runText = null;
      this.previewSince = 0;
      this.previews = [];
      if (this.previewsEl) this.previewsEl.innerHTML = "";
      this.cancelButton.disabled = true;
      try {
        window.localStorage.removeItem(this.runKey());
      } catch (err) {
        /* nothing kept */
      }
    },

    async cancel(runId) {
      const id = runId || this.followed;
      if (!id) return;
      const result = await this.call("df_cancel", id);
      if (result && result.ok) {
        this.setMessage(`cancelling run #${result.run.number}…`);
        this.runText = null;
      }
      this.pollSoon(0);
    },

    pollSoon(delay) {
      clearTimeout(this.pollTimer);
      this.pollTimer = setTimeout(() => this.poll(), delay);
    },

    async poll() {
      let next = 1500;
      try {
        const result = await this.call("df_poll", { run: this.followed, since: this.previewSince });
        if (result) {
          this.queue = result.queue || [];
          this.renderQueue();
          this.renderResults();
          this.refreshOpenRun();
          if (result.run && result.run.id === this.followed) {
            this.applyRun(result.run);
            if (RUN_ACTIVE[result.run.status]) next = 250;
          }
        }
      } finally {
        this.pollSoon(next);
      }
    },

    /* The status line of a run: "run #3: running — sample 12/25", "run #3: done in 1.20s — …". */
    runLine(run) {
      const active = !!RUN_ACTIVE[run.status];
      let text = `run #${run.number}: ${run.status}`;
      if (run.status === "queued" && run.position) text += ` (${run.position - 1} ahead)`;
      if (run.points > 1) text += ` — point ${run.point}/${run.points}`;
      if (run.node && run.status === "running") {
        const p = run.progress[run.node];
        text += ` — ${run.node}${p && p.total ? ` ${p.step}/${p.total}` : ""}`;
      }
      if (run.message && !active) {
        // "done in 1.2s — …" and "cancelled before it started" already say the status.
        if (run.message === run.status || run.message.startsWith(run.status + " ")) text = `run #${run.number}: ${run.message}`;
        else text += ` — ${run.message}`;
      } else if (run.message === "cancelling…") text += " — cancelling…";
      return text;
    },

    applyRun(run, opts) {
      this.lastRun = run;
      for (const node of this.graph._nodes) {
        const status = run.nodes[node.dfId];
        node.dfStatus = status && status !== "idle" ? status : null;
        node.dfProgress = run.progress[node.dfId] || null;
        node.dfError = run.errors[node.dfId] || null;
      }
      if (!(opts && opts.quiet)) {
        for (const preview of run.previews || []) {
          this.previewSince = Math.max(this.previewSince, preview.index + 1);
          this.addPreview(preview);
        }
      } else {
        for (const preview of this.previews) this.showOnNode(preview);
      }
      const active = !!RUN_ACTIVE[run.status];
      this.cancelButton.disabled = !active;
      this.root.dataset.runStatus = run.status;
      this.root.dataset.runId = run.id;
      // The status line changes only when the run's state does, and never over a message
      // about the user's last action (that one stays until their next action).
      const text = this.runLine(run);
      if (text !== this.runText) {
        this.runText = text;
        if (!this.pinned) this.setMessage(text, STATUS_KIND[run.status] || "");
      }
      if (run.problems && run.problems.length) this.showProblems(run.problems, []);
      this.lgc.setDirty(true, true);
    },

    showOnNode(preview) {
      const node = this.nodeById(preview.node);
      if (!node || !preview.img) return;
      node.dfPreview = preview.img;
      this.lgc.setDirty(true, true);
    },

    addPreview(preview) {
      const img = new Image();
      const shown = Object.assign({}, preview, { img });
      this.previews.push(shown);
      if (this.previews.length > 24) this.previews.shift();
      img.onload = () => this.showOnNode(shown);
      img.src = preview.url;
      img.alt = `${preview.node}: ${preview.label}`;
      const figure = el(
        "figure",
        { class: "df-preview", "data-testid": "df-preview", dataset: { node: preview.node, index: String(preview.index), kind: preview.kind } },
        el("img", { src: preview.url, alt: img.alt, onclick: () => this.showFull(preview.url, img.alt) }),
        el("figcaption", { text: `${preview.node}${preview.label ? " — " + preview.label : ""}` })
      );
      this.previewsEl.prepend(figure);
      while (this.previewsEl.children.length > 24) this.previewsEl.lastChild.remove();
    },

    /* --- the queue and history ----------------------------------------------------------- */

    renderQueue() {
      const box = this.queueEl;
      box.innerHTML = "";
      if (!this.queue.length) {
        box.appendChild(el("div", { class: "df-empty", text: "No runs yet." }));
        return;
      }
      for (const run of this.queue) {
        let detail = "";
        if (run.status === "queued" && run.position) detail = `${run.position - 1} ahead`;
        else if (run.status === "running") detail = `${run.done}/${run.planned} nodes${run.node ? " · " + run.node : ""}`;
        else if (run.seconds !== null && run.seconds !== undefined) detail = `${run.seconds.toFixed(2)}s · ${when(run.finished || run.submitted)}`;
        const open = this.openRun === run.id;
        box.appendChild(
          el(
            "div",
            {
              class: `df-run df-run-${run.status}${run.id === this.followed ? " df-followed" : ""}${open ? " df-open" : ""}`,
              "data-testid": "df-run-entry",
              dataset: { run: run.id, status: run.status, number: String(run.number) },
              title: run.message || "",
              onclick: () => {
                if (run.id !== this.followed) this.follow(run.id);
                this.toggleResults(run.id);
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
    },

    /* Loads the open run's results once it has finished (called after each queue update). */
    refreshOpenRun() {
      const run = this.openRun && this.queue.find((r) => r.id === this.openRun);
      if (run && !RUN_ACTIVE[run.status] && !this.results[run.id] && !this.resultsPending) this.loadResults(run.id);
    },

    toggleResults(runId) {
      this.openRun = runId;
      this.renderQueue();
      this.renderResults();
      const run = this.queue.find((r) => r.id === runId);
      if (run && !RUN_ACTIVE[run.status]) this.loadResults(runId);
      else this.renderResults();
    },

    async loadResults(runId) {
      if (!this.results[runId]) {
        this.resultsPending = true;
        try {
          const result = await this.call("df_results", runId);
          if (result && result.ok && !(result.notes || []).includes("the run has not finished")) this.results[runId] = result;
        } finally {
          this.resultsPending = false;
        }
      }
      if (this.openRun === runId) {
        this.resultsShown = null;
        this.renderResults();
      }
    },

    /* The open run's details: status, times, output folder, pictures and text results. */
    renderResults() {
      const box = this.resultsEl;
      const run = this.queue.find((r) => r.id === this.openRun);
      const shown = run ? `${run.id}:${run.status}:${!!this.results[run.id]}` : "";
      if (shown === this.resultsShown) return; // unchanged: keep the pictures as they are
      this.resultsShown = shown;
      box.innerHTML = "";
      if (!run) return;
      box.dataset.run = run.id;
      const lines = [
        ["status", !run.message || run.message === run.status ? run.status : run.message.startsWith(run.status + " ") ? run.message : `${run.status} — ${run.message}`],
        ["submitted", when(run.submitted)],
        ["finished", when(run.finished)],
        ["time", run.seconds !== null && run.seconds !== undefined ? `${run.seconds.toFixed(2)}s` : ""],
      ];
      const result = this.results[run.id];
      const folders = (result && result.folders) || run.output_dirs || [];
      box.appendChild(el("h4", { text: `Run #${run.number} ${run.name}` }));
      const table = el("dl", { class: "df-run-facts" });
      for (const [key, value] of lines) if (value) table.append(el("dt", { text: key }), el("dd", { text: value }));
      if (folders.length) table.append(el("dt", { text: "output" }), el("dd", { "data-testid": "df-result-folder" }, folders.map((f) => el("code", { text: f }))));
      box.appendChild(table);
      if (RUN_ACTIVE[run.status]) {
        box.appendChild(el("div", { class: "df-empty", text: "Results appear here when the run has finished." }));
        return;
      }
      if (!result) {
        box.appendChild(el("div", { class: "df-empty", text: "loading results…" }));
        return;
      }
      if (result.images.length) {
        const gallery = el("div", { class: "df-gallery", "data-testid": "df-gallery" });
        for (const image of result.images) {
          gallery.appendChild(
            el("figure", { class: "df-preview", "data-testid": "df-result-image", dataset: { name: image.name } },
              el("img", { src: image.url, alt: image.name, title: `${image.path} — click for full size`, onclick: () => this.showFull(image.url, image.path) }),
              el("figcaption", { text: image.name }))
          );
        }
        box.appendChild(gallery);
      }
      for (const text of result.texts) {
        box.appendChild(
          el("details", { class: "df-result-text", "data-testid": "df-result-text", dataset: { name: text.name }, open: result.texts.length <= 3 },
            el("summary", { text: text.name + (text.truncated ? " (first 64 KiB)" : "") }),
            el("pre", { text: text.text }))
        );
      }
      if (!result.images.length && !result.texts.length) box.appendChild(el("div", { class: "df-empty", text: "No pictures or text files in its output folder." }));
      for (const note of result.notes || []) box.appendChild(el("div", { class: "df-warning", text: note }));
    },

    showFull(url, caption) {
      this.lightbox.innerHTML = "";
      this.lightbox.append(el("img", { src: url, alt: caption || "" }), el("div", { class: "df-lightbox-caption", text: `${caption || ""} — click to close` }));
      this.lightbox.hidden = false;
    },
  });
})();
