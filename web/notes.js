// What the pack's nodes say after a run, shown on the node: a step cache or DifferentialDiffusion neutralised, a
// schedule that cannot be inverted, a mask thinner than a latent cell (warnings), the schedule that ran and the
// balance each layer got (notes). The frontends draw a node's "text" output only on their own PreviewAny node, so
// without this the pack's notes reached the server log and /history only.
//
// The Python side (nodes/geometry.py _ui_text) sends them as the ui output "ha_notes": [{level, text}], always, so
// a run with nothing to say replaces the last run's notes; "text" carries the same for API users.
//
// On the node: a one-line bar under its widgets, the first warning (else the first note) and how many there are;
// warnings amber, notes grey; nothing at all when the last run said nothing. A click (or Enter) opens every section
// in a scrollable box over the graph, at the screen's own size whatever the zoom; a click elsewhere, Escape or a
// second click closes it. The bar has a fixed height from the node's creation on, so a run never grows the node
// (scripts/workflow_format.py NODE_EXTRA_HEIGHT gives it its room in the shipped workflows).
//
// The bar follows the frontend's store of the last outputs (app.nodeOutputs): it shows what a run just sent, and
// what the frontend restores when a workflow tab is opened again (1.27 reassigns the store, 1.49 also tells
// extensions through onNodeOutputsUpdated).
import { app } from "../../scripts/app.js"
import { addViewWidget, chain, el, typeOf } from "./node_dom.js"

const PACK = "HA_"
// the nodes whose ui output has "ha_notes" (nodes/geometry.py, nodes/appearance.py): their bar is there from the
// node's creation; another HA_ node that sends notes gets its bar at its first notes
const SPEAKERS = new Set(["HA_TextureAligningInversion", "HA_GeometryPreservingSampler", "HA_AppearanceInversion",
                          "HA_CrossImageSampler"])
const BAR = 24  // CSS px: the bar's height
const MARGIN = 5  // CSS px around it inside the node (the frontends' DOM widget margin, on each side)
const HEIGHT = BAR + 2 * MARGIN  // the widget's height in the node's layout
const WARNING = { accent: "#f0a030", background: "rgba(240, 160, 48, 0.17)", icon: "⚠", label: "Warning" }
// the note's "i" in a drawn circle: many systems' fonts (headless Chromium's among them) lack a glyph for ⓘ
const INFO = { accent: "#7d8fa8", background: "var(--comfy-input-bg, #222222)", icon: "i", circled: true, label: "Note" }
const FONT = "12px/1.4 sans-serif"  // the widgets' size on the canvas (the bar scales with the graph's zoom)
const POPUP_FONT = "13px/1.45 sans-serif"  // the open box: the screen's size at any zoom

const bars = new Set()  // the live bars
let seenOutputs = null  // app.nodeOutputs as last synced: a new object is a restored (or cleared) store

/** The sections of a node's ui output: its "ha_notes", else its "text" (split at blank lines) as notes. */
function sectionsOf(output) {
  if (Array.isArray(output?.ha_notes)) {
    return output.ha_notes.filter((s) => s?.text).map((s) => ({ level: s.level === "warning" ? "warning" : "info",
                                                                 text: String(s.text) }))
  }
  const text = Array.isArray(output?.text) ? output.text.join("\n\n") : ""
  return text.split(/\n\s*\n/).filter((t) => t.trim()).map((t) => ({ level: "info", text: t.trim() }))
}

const styleOf = (level) => (level === "warning" ? WARNING : INFO)

/** The level's icon, in its accent colour. */
function iconOf(look, parent) {
  const style = look.circled
    ? { display: "inline-flex", alignItems: "center", justifyContent: "center", boxSizing: "border-box", width: "13px",
        height: "13px", borderRadius: "50%", border: `1.5px solid ${look.accent}`, font: "bold 9px/1 serif" }
    : { fontSize: "13px" }
  const icon = el("span", { flex: "0 0 auto", color: look.accent, ...style }, parent, "ha-notes-icon")
  icon.textContent = look.icon
  return icon
}
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`

/** The key of a node's entry in app.nodeOutputs (a node in a subgraph: "<subgraph id>:<node id>"). */
function locatorOf(node) {
  const graph = node.graph
  return graph && graph !== app.graph && graph.isRootGraph === false ? `${graph.id}:${node.id}` : String(node.id)
}

class NotesBar {
  constructor(node) {
    this.node = node
    this.sections = []
    this.entry = undefined  // the ui output shown (an app.nodeOutputs entry)
    // minHeight: Vue nodes (Nodes 2.0) size a DOM widget by its content; the bar's room stays when it is hidden
    this.element = el("div", { width: "100%", height: "100%", minHeight: `${BAR}px`, display: "flex", alignItems: "center" },
                      null, "ha-notes")
    this.bar = el("div", { display: "none", alignItems: "center", gap: "6px", width: "100%", height: `${BAR}px`,
      boxSizing: "border-box", padding: "0 8px 0 6px", borderRadius: "4px", borderLeft: "3px solid",
      font: FONT, color: "var(--input-text, #dddddd)", cursor: "pointer", userSelect: "none", overflow: "hidden" },
    this.element, "ha-notes-bar")
    this.bar.tabIndex = 0
    this.icon = iconOf(INFO, this.bar)
    this.summary = el("span", { flex: "1 1 auto", minWidth: "0", overflow: "hidden", textOverflow: "ellipsis",
      whiteSpace: "nowrap" }, this.bar, "ha-notes-summary")
    this.count = el("span", { flex: "0 0 auto", opacity: "0.75" }, this.bar, "ha-notes-count")
    const stop = (e) => e.stopPropagation()  // the canvas does not drag or select the node under the bar
    this.bar.addEventListener("pointerdown", (e) => {
      stop(e)
      if (e.button === 0) popup.toggle(this)
    })
    this.bar.addEventListener("keydown", (e) => {
      if (e.key !== "Enter" && e.key !== " ") return
      stop(e)
      e.preventDefault()
      popup.toggle(this)
    })
    for (const type of ["mousedown", "click", "dblclick", "contextmenu", "wheel"]) {
      this.bar.addEventListener(type, type === "wheel" ? () => popup.close() : stop)
    }
  }

  /** Show a ui output (null or undefined: nothing). */
  show(output) {
    this.entry = output
    this.sections = sectionsOf(output)
    const warnings = this.sections.filter((s) => s.level === "warning")
    const first = warnings[0] ?? this.sections[0]
    if (!first) {
      this.bar.style.display = "none"
      this.bar.title = ""
      popup.closeFor(this)
      return
    }
    const look = styleOf(first.level)
    Object.assign(this.bar.style, { display: "flex", background: look.background, borderLeftColor: look.accent })
    this.bar.dataset.level = first.level
    const icon = iconOf(look)
    this.icon.replaceWith(icon)
    this.icon = icon
    this.summary.textContent = first.text.split("\n")[0]
    const more = this.sections.length - 1
    this.count.textContent = more ? `+${more} ▾` : "▾"
    const notes = this.sections.length - warnings.length
    this.bar.title = `The last run: ${[warnings.length && plural(warnings.length, "warning"), notes && plural(notes, "note")]
      .filter(Boolean).join(", ")}. Click to read them.`
    popup.refresh(this)
  }

  /** Follow the frontend's store of outputs: `restored` (a new store: a tab opened again, the graph cleared) shows
   *  whatever it holds for the node; otherwise only an entry other than the one shown replaces it. */
  sync(restored) {
    const entry = app.nodeOutputs?.[locatorOf(this.node)]
    if (entry !== this.entry && (entry !== undefined || restored)) this.show(entry)
  }

  /** What the tests check: the bar as drawn (client px) and every section. */
  describe() {
    const r = this.bar.getBoundingClientRect()
    return {
      shown: this.bar.style.display !== "none" && this.bar.isConnected && r.width > 0, level: this.bar.dataset.level ?? null,
      summary: this.bar.style.display === "none" ? "" : this.bar.innerText, rect: [r.left, r.top, r.width, r.height],
      sections: this.sections, open: popup.owner === this,
    }
  }
}

// ------------------------------------------------------------------ the open box (one at a time)

const popup = {
  owner: null,
  box: null,

  toggle(bar) {
    if (this.owner === bar) this.close()
    else this.open(bar)
  },

  open(bar) {
    this.close()
    if (!bar.sections.length) return
    this.owner = bar
    this.box = el("div", { position: "fixed", zIndex: "10000", boxSizing: "border-box", overflowY: "auto",
      padding: "8px 10px 10px", borderRadius: "6px", border: "1px solid var(--border-color, #4e4e4e)",
      background: "var(--comfy-menu-bg, #353535)", color: "var(--input-text, #dddddd)", font: POPUP_FONT,
      boxShadow: "0 6px 24px rgba(0, 0, 0, 0.45)", userSelect: "text" }, document.body, "ha-notes-popup")
    this.box.setAttribute("role", "dialog")
    for (const type of ["pointerdown", "mousedown", "wheel", "keydown", "contextmenu"]) {
      this.box.addEventListener(type, (e) => e.stopPropagation())
    }
    this.fill()
    document.addEventListener("pointerdown", this.outside, true)
    document.addEventListener("keydown", this.escape, true)
    this.follow()
  },

  fill() {
    const bar = this.owner
    this.box.replaceChildren()
    const head = el("div", { display: "flex", alignItems: "baseline", gap: "8px", marginBottom: "6px" }, this.box)
    el("div", { flex: "1 1 auto", fontWeight: "600" }, head).textContent = `${bar.node.title || typeOf(bar.node)}: last run`
    const close = el("button", { flex: "0 0 auto", border: "none", background: "none", color: "inherit",
      font: "16px sans-serif", cursor: "pointer", padding: "0 2px" }, head, "ha-notes-close")
    close.textContent = "×"
    close.title = "Close (Esc)"
    close.addEventListener("click", () => this.close())
    const ordered = [...bar.sections.filter((s) => s.level === "warning"), ...bar.sections.filter((s) => s.level !== "warning")]
    for (const section of ordered) {
      const look = styleOf(section.level)
      const item = el("div", { margin: "6px 0 0", padding: "6px 8px", borderRadius: "4px",
        borderLeft: `3px solid ${look.accent}`, background: look.background }, this.box, `ha-note ha-note-${section.level}`)
      item.dataset.level = section.level
      const label = el("div", { display: "flex", alignItems: "center", gap: "5px", font: "600 11px sans-serif",
        letterSpacing: "0.04em", textTransform: "uppercase", color: look.accent, marginBottom: "2px" }, item)
      iconOf(look, label)
      el("span", {}, label).textContent = look.label
      el("div", { whiteSpace: "pre-wrap", overflowWrap: "anywhere" }, item, "ha-note-text").textContent = section.text
    }
  },

  /** Keep the box beside its bar while the graph pans or zooms; close it when the bar goes out of sight. */
  follow() {
    if (!this.owner) return
    const r = this.owner.bar.getBoundingClientRect()
    if (!this.owner.bar.isConnected || r.width === 0 || this.owner.bar.style.display === "none") return this.close()
    const margin = 8, vw = window.innerWidth, vh = window.innerHeight
    const width = Math.min(Math.max(r.width, 420), 620, vw - 2 * margin)
    const below = vh - r.bottom - 2 * margin, above = r.top - 2 * margin
    const room = Math.max(below, above)
    const height = Math.min(this.box.scrollHeight, Math.max(120, Math.min(room, 0.6 * vh)))
    const top = below >= height || below >= above ? r.bottom + 4 : r.top - 4 - height
    Object.assign(this.box.style, { width: `${width}px`, maxHeight: `${height}px`,
      left: `${Math.min(Math.max(margin, r.left), vw - width - margin)}px`,
      top: `${Math.min(Math.max(margin, top), vh - height - margin)}px` })
    this.frame = requestAnimationFrame(() => this.follow())
  },

  refresh(bar) {
    if (this.owner === bar) this.fill()
  },

  closeFor(bar) {
    if (this.owner === bar) this.close()
  },

  close() {
    cancelAnimationFrame(popup.frame)
    popup.box?.remove()
    popup.box = popup.owner = null
    document.removeEventListener("pointerdown", popup.outside, true)
    document.removeEventListener("keydown", popup.escape, true)
  },

  outside(e) {
    if (!popup.box?.contains(e.target) && !popup.owner?.bar.contains(e.target)) popup.close()
  },

  escape(e) {
    if (e.key !== "Escape") return
    e.stopPropagation()
    popup.close()
  },
}

// ------------------------------------------------------------------ registration

function attach(node) {
  if (node.haNotes || !node.addDOMWidget) return node.haNotes
  const bar = new NotesBar(node)
  node.haNotes = bar
  addViewWidget(node, "notes", "ha_notes", bar.element,
                { margin: MARGIN, getMinHeight: () => HEIGHT, getMaxHeight: () => HEIGHT })
  bars.add(bar)
  chain(node, "onRemoved", () => {
    bars.delete(bar)
    popup.closeFor(bar)
  })
  chain(node, "onAdded", () => bars.add(bar))
  return bar
}

/** Every bar follows the store; a new store object is a restore. */
function syncAll() {
  const outputs = app.nodeOutputs
  const restored = outputs !== seenOutputs
  seenOutputs = outputs
  for (const bar of bars) {
    if (bar.node.graph) bar.sync(restored)
    else if (!bar.element.isConnected) bars.delete(bar)  // its graph closed; onAdded brings it back
  }
}

app.registerExtension({
  name: "harmonizing_attention.notes",
  nodeCreated(node) {
    const type = typeOf(node)
    if (typeof type !== "string" || !type.startsWith(PACK)) return
    if (SPEAKERS.has(type)) attach(node)
    chain(node, "onExecuted", (output) => {
      if (sectionsOf(output).length || node.haNotes) attach(node)?.show(output)
    })
  },
  onNodeOutputsUpdated() {  // 1.49: the store restored (a tab opened again) or filled from the queue's history
    syncAll()
  },
  setup() {
    setInterval(syncAll, 400)  // 1.27 says nothing when it restores the store
  },
})
