/* dagfusion canvas — undo/redo and the keyboard.
 *
 * Undo keeps snapshots of the graph (dagfusion's graph schema, groups included): every edit
 * that reaches the graph — adding, deleting, moving, linking, unlinking, changing a value,
 * renaming, grouping — is recorded when the canvas syncs it (edits within 200 ms make one
 * step). Ctrl+Z undoes, Ctrl+Shift+Z (or Ctrl+Y) redoes. The other keys: Ctrl+Enter runs,
 * Ctrl+S saves, Delete removes the selected nodes, Ctrl+C/Ctrl+V copy and paste them (with the
 * links between them), Ctrl+A selects every node, Ctrl+B bypasses the selected nodes, Ctrl+O
 * opens a file (as Open… does), and the arrow keys move the selected nodes by a grid step (with
 * Shift, five steps). Colours and collapsing, set from the node's menu, are undone like any edit.
 * Methods of CanvasApp (see canvas.js).
 */
(function () {
  "use strict";

  const MAX_UNDO = 100;
  const ARROWS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };

  function editable(target) {
    if (!target || !target.tagName) return false;
    const tag = target.tagName.toLowerCase();
    return tag === "input" || tag === "textarea" || tag === "select" || target.isContentEditable;
  }

  window.DagfusionCanvas.mixin({
    /* Called by syncNow with the graph's JSON text whenever it changed. */
    recordEdit(text) {
      if (this.restoringHistory || this.undoCurrent === undefined) {
        this.undoCurrent = text;
        return;
      }
      if (text === this.undoCurrent) return;
      this.undoPast.push(this.undoCurrent);
      if (this.undoPast.length > MAX_UNDO) this.undoPast.shift();
      this.undoFuture = [];
      this.undoCurrent = text;
      this.updateUndoButtons();
    },

    resetHistory(text) {
      this.undoPast = [];
      this.undoFuture = [];
      this.undoCurrent = text;
      this.updateUndoButtons();
    },

    flushEdits() {
      if (this.syncTimer) {
        clearTimeout(this.syncTimer);
        this.syncTimer = null;
        this.syncNow();
        if (this.pendingCheck) this.checkNow();
        this.pendingCheck = false;
      } else {
        this.syncNow();
      }
    },

    undo() {
      this.flushEdits();
      if (!this.undoPast.length) return this.setMessage("nothing to undo", "", { pin: true });
      this.undoFuture.push(this.undoCurrent);
      this.restoreSnapshot(this.undoPast.pop());
      this.setMessage(`undone (${this.undoPast.length} more step${this.undoPast.length === 1 ? "" : "s"} to undo)`, "", { pin: true });
    },

    redo() {
      this.flushEdits();
      if (!this.undoFuture.length) return this.setMessage("nothing to redo", "", { pin: true });
      this.undoPast.push(this.undoCurrent);
      this.restoreSnapshot(this.undoFuture.pop());
      this.setMessage("redone", "", { pin: true });
    },

    restoreSnapshot(text) {
      const selected = Object.values(this.lgc.selected_nodes || {}).map((n) => n.dfId);
      this.undoCurrent = text;
      this.restoringHistory = true;
      try {
        this.loadGraph(JSON.parse(text), { send: true, keepView: true, keepRun: true });
      } finally {
        this.restoringHistory = false;
      }
      for (const id of selected) {
        const node = this.nodeById(id);
        if (node) this.lgc.selectNode(node, true);
      }
      this.renderInspector();
      this.updateUndoButtons();
    },

    updateUndoButtons() {
      if (this.undoButton) this.undoButton.disabled = !(this.undoPast && this.undoPast.length);
      if (this.redoButton) this.redoButton.disabled = !(this.undoFuture && this.undoFuture.length);
    },

    /* --- the keyboard ------------------------------------------------------------------- */

    bindKeys() {
      this.undoPast = [];
      this.undoFuture = [];
      document.addEventListener("keydown", (e) => this.onKey(e), true);
    },

    onKey(e) {
      if (!this.graph || !this.root.isConnected) return;
      const ctrl = e.ctrlKey || e.metaKey;
      const key = e.key.toLowerCase();
      if (ctrl && key === "enter") {
        e.preventDefault();
        this.run();
        return;
      }
      if (ctrl && key === "s") {
        e.preventDefault();
        this.save();
        return;
      }
      if (editable(e.target) || (this.searchBox && this.searchBox.contains(e.target))) return;
      if (ctrl && key === "z") {
        e.preventDefault();
        e.stopPropagation();
        if (e.shiftKey) this.redo();
        else this.undo();
      } else if (ctrl && key === "y") {
        e.preventDefault();
        e.stopPropagation();
        this.redo();
      } else if (ctrl && key === "o") {
        e.preventDefault();
        e.stopPropagation();
        this.openDialog();
      } else if (!ctrl && !e.altKey && ARROWS[e.key]) {
        const [dx, dy] = ARROWS[e.key];
        if (!this.nudgeSelection(dx, dy, e.shiftKey ? 5 : 1)) return;
        e.preventDefault();
        e.stopPropagation();
      } else if (ctrl && key === "b") {
        e.preventDefault();
        e.stopPropagation();
        this.toggleBypass();
      } else if (ctrl && key === "a") {
        e.preventDefault();
        e.stopPropagation();
        this.lgc.selectNodes();
        this.renderInspector();
      } else if (ctrl && key === "c") {
        if (!Object.keys(this.lgc.selected_nodes || {}).length) return;
        e.preventDefault();
        e.stopPropagation();
        this.copySelection();
      } else if (ctrl && key === "v") {
        e.preventDefault();
        e.stopPropagation();
        this.pasteClipboard();
      } else if ((key === "delete" || key === "backspace") && !ctrl) {
        if (!Object.keys(this.lgc.selected_nodes || {}).length) return;
        e.preventDefault();
        e.stopPropagation();
        this.lgc.deleteSelectedNodes();
        this.renderInspector();
      } else if (key === "escape" && this.searchBox) {
        this.closeSearch();
      }
    },
  });
})();
