// The placement view of HA_GeometryImageEdit and HA_AddGeometry: the target image with the source patch (cut by its mask)
// drawn where shift_x / shift_y / scale / rotation put it, with the outline of M_geo; an HA_AddGeometry also shows the
// geometries placed before it in its scene chain, dimmed. Drag the patch to move it, a corner handle (or the wheel over
// the patch) to scale, the round handle to rotate; arrow keys nudge by one target pixel (Shift: ten); double-click
// resets. Every gesture writes those four widgets and nothing else: the view itself is not serialised (not in
// widgets_values, not in the API prompt).
//
// Images: from the upstream LoadImage / LoadImageMask nodes (their files, as the nodes read them; a HA_AddGeometry's
// target is the one its scene chain starts from, at the HA_GeometryImageEdit), else from the node's last run (its ui
// output "ha_placement"), else a box that says what to connect.
//
// Drawn at the screen's resolution: the backing store follows the device pixel ratio times the graph's zoom (the
// frontends CSS-scale DOM widgets), so the view is sharp at any zoom.
import { app } from "../../scripts/app.js"
import { api } from "../../scripts/api.js"
import { addViewWidget, chain, el, typeOf } from "./node_dom.js"
import * as M from "./placement_math.js"

const EDIT = "HA_GeometryImageEdit", ADD = "HA_AddGeometry"
const NODES = new Set([EDIT, ADD])  // both place a source on the target with the same four widgets
const PARAMS = ["shift_x", "shift_y", "scale", "rotation"]
const DEFAULTS = { shift_x: 0, shift_y: 0, scale: 1, rotation: 0 }
const ROLES = ["source", "source_mask", "target"]
const PAD = 12  // CSS px around the target inside the view: room for handles at its edges
const HANDLE = 4.5  // CSS px: half the side of a corner handle
const CLEAR = HANDLE + 4  // CSS px between the patch's box and the handle frame: handles never cover the patch
const ARM = 20  // CSS px from the frame's top edge to the rotation handle
const HINT_HEIGHT = 22  // CSS px of the instruction line under the image
const MIN_STAGE = 120  // CSS px: the least height of the image area
const NODE_WIDTH = 400  // a new node's width: the target drawn about 370 px wide
const WIDGET_MARGIN = 10  // the frontends' DOM widget margin on each side (the view is the node's width less these)
const WIDGET_SLACK = 8  // px of a DOM widget's height the frontends keep below the element
const MAX_BACKING = 4096  // px per side of the canvas backing store, at extreme zoom
const OUTLINE = "#ffd400"
const EARLIER_ALPHA = 0.55
const HINTS = [  // the longest that fits is shown
  "Drag the patch to move it · drag a corner or turn the wheel to scale · drag the round handle to rotate · " +
    "arrow keys: 1 px (Shift: 10) · double-click: reset",
  "Drag: move · corner or wheel: scale · round handle: rotate · arrows: 1 px · double-click: reset",
  "Drag: move · corner: scale · round handle: rotate · double-click: reset",
  "Drag: move · corner: scale · round handle: rotate",
  "Drag · corner: scale · handle: rotate",
  "Drag to move",
]
const WANTED = {
  source: "<b>source</b>: a <i>Load Image</i> with the photo that has the geometry (the crack, the hole)",
  source_mask: "<b>source_mask</b>: that <i>Load Image</i>'s MASK output. Paint the geometry on it: right-click the " +
    "node, <i>Open in MaskEditor</i>, paint, <i>Save</i>",
  target: "<b>target</b>: a <i>Load Image</i> with the photo to put the geometry on",
  scene: "<b>scene</b>: the scene output of <i>Geometry Image Edit</i> (or of another <i>Add Geometry</i>)",
}

// ------------------------------------------------------------------ images

const pixelCache = new Map()  // url -> Promise<{width, height, data}>

async function decode(url) {
  const response = await fetch(url, { cache: "no-cache" })
  if (!response.ok) throw new Error(`${response.status} for ${url}`)
  // raw file values, as PIL reads them: no colour management
  const bitmap = await createImageBitmap(await response.blob(), { colorSpaceConversion: "none", premultiplyAlpha: "none" })
  const canvas = document.createElement("canvas")
  canvas.width = bitmap.width
  canvas.height = bitmap.height
  const ctx = canvas.getContext("2d", { willReadFrequently: true })
  ctx.drawImage(bitmap, 0, 0)
  bitmap.close?.()
  return { width: canvas.width, height: canvas.height, data: ctx.getImageData(0, 0, canvas.width, canvas.height).data }
}

/** The file's RGBA values as LoadImage reads them. A 2D canvas stores colours premultiplied by alpha, so where a file
 *  is transparent (the area painted in the mask editor has alpha 0) its RGB would read as black: those colours come
 *  from the server's RGB rendering of the same file (/view's channel=rgb), the alpha from the file itself. */
async function loadPixels(url) {
  const image = await decode(url)
  const { data } = image
  let opaque = true
  for (let i = 3; i < data.length && opaque; i += 4) opaque = data[i] === 255
  if (opaque || !url.includes("/view?")) return image
  const rgb = await decode(`${url}&channel=rgb`)
  if (rgb.width !== image.width || rgb.height !== image.height) return image
  for (let i = 0; i < data.length; i += 4) {
    data[i] = rgb.data[i]
    data[i + 1] = rgb.data[i + 1]
    data[i + 2] = rgb.data[i + 2]
  }
  return image
}

function pixels(url) {
  if (!pixelCache.has(url)) {
    const promise = loadPixels(url)
    promise.catch(() => pixelCache.delete(url))
    pixelCache.set(url, promise)
    while (pixelCache.size > 24) pixelCache.delete(pixelCache.keys().next().value)
  }
  return pixelCache.get(url)
}

/** A canvas of the image's colours, opaque (LoadImage's IMAGE has no alpha), made once per image. */
function opaqueCanvas(image) {
  if (!image.opaque) {
    const canvas = document.createElement("canvas")
    canvas.width = image.width
    canvas.height = image.height
    const ctx = canvas.getContext("2d")
    const out = ctx.createImageData(image.width, image.height)
    out.data.set(image.data)
    for (let i = 3; i < out.data.length; i += 4) out.data[i] = 255
    ctx.putImageData(out, 0, 0)
    image.opaque = canvas
  }
  return image.opaque
}

/** /view URL of an image widget's value ("sub/name.png [input]"). */
function viewURL(value, type = "input") {
  const m = /^(.*) \[(input|output|temp)\]$/.exec(value)
  if (m) [value, type] = [m[1], m[2]]
  const i = value.lastIndexOf("/")
  const params = new URLSearchParams({ filename: value.slice(i + 1), type, subfolder: i >= 0 ? value.slice(0, i) : "" })
  return api.apiURL(`/view?${params}`)
}

// ------------------------------------------------------------------ the graph

const widgetOf = (node, name) => node?.widgets?.find((w) => w.name === name)
const titleOf = (node) => node?.title || typeOf(node)

/** {origin, link} of the node linked to an input (whatever its mode), or null when the input is not linked. */
function linked(node, inputName) {
  const slot = (node.inputs ?? []).findIndex((input) => input.name === inputName)
  if (slot < 0 || node.inputs[slot].link == null) return null
  const link = node.getInputLink?.(slot)
  const origin = node.getInputNode?.(slot)
  return link && origin ? { origin, link } : null
}

/** linked(), unless the origin is muted or bypassed. */
function feeding(node, inputName) {
  const up = linked(node, inputName)
  return !up || up.origin.mode === 2 || up.origin.mode === 4 ? null : up
}

/** {url, channel} of the file an input reads, when a LoadImage / LoadImageMask feeds it directly. */
function upstream(node, inputName) {
  const { origin, link } = feeding(node, inputName) ?? {}
  const image = widgetOf(origin, "image")?.value
  if (typeof image !== "string" || !image) return null
  const type = typeOf(origin)
  if (type === "LoadImage") return { url: viewURL(image), channel: link.origin_slot === 1 ? "alpha" : null }
  if (type === "LoadImageMask") return { url: viewURL(image), channel: widgetOf(origin, "channel")?.value ?? "alpha" }
  return null
}

/** The HA nodes up a HA_AddGeometry's scene chain, nearest first, ending at the HA_GeometryImageEdit that made the
 *  scene; a bypassed HA_AddGeometry passes the scene through (and places nothing). null when the chain is broken. */
function sceneChain(node) {
  const chain = [], seen = new Set([node])
  for (let n = node; ;) {
    const origin = linked(n, "scene")?.origin
    if (!origin || seen.has(origin) || origin.mode === 2) return null
    seen.add(origin)
    const type = typeOf(origin)
    if (type === EDIT && origin.mode !== 4) return [...chain, origin]
    if (type !== ADD) return null
    if (origin.mode !== 4) chain.push(origin)
    n = origin
  }
}

// ------------------------------------------------------------------ the view

let measure = null  // a 2D context for text widths

class PlacementView {
  constructor(node) {
    this.node = node
    this.element = el("div", { position: "relative", width: "100%", height: "100%", display: "flex",
      flexDirection: "column", overflow: "hidden", borderRadius: "4px", background: "#1b1b1b" }, null, "ha-placement")
    this.stage = el("div", { position: "relative", flex: "1 1 auto", minHeight: "0" }, this.element)
    this.canvas = el("canvas", { position: "absolute", inset: "0", width: "100%", height: "100%", outline: "none",
      touchAction: "none", cursor: "default" }, this.stage)
    this.canvas.tabIndex = 0
    this.canvas.title = HINTS[0]
    // what to connect, or why there is nothing to place: a readable box over the view
    this.notice = el("div", { position: "absolute", left: "50%", top: "50%", transform: "translate(-50%, -50%)",
      width: "max-content", maxWidth: "calc(100% - 24px)", maxHeight: "calc(100% - 16px)", overflow: "hidden",
      boxSizing: "border-box", padding: "10px 12px", borderRadius: "6px", background: "rgba(24, 24, 24, 0.9)",
      border: "1px solid #4a4a4a", color: "#dddddd", font: "12.5px/1.45 sans-serif", pointerEvents: "none",
      display: "none" }, this.stage, "ha-placement-notice")
    this.hint = el("div", { flex: `0 0 ${HINT_HEIGHT}px`, lineHeight: `${HINT_HEIGHT}px`, padding: "0 8px",
      font: "11.5px sans-serif", color: "#b8b8b8", background: "#242424", whiteSpace: "nowrap", overflow: "hidden",
      textOverflow: "ellipsis", textAlign: "center", userSelect: "none" }, this.element, "ha-placement-hint")
    this.inputs = {}  // role -> {key, channel, data | null, error}
    this.lastRun = null  // role -> url, from the node's last execution
    this.wanted = []  // roles with nothing to show: {role, why: "unlinked" | "run", from}
    this.drag = null
    this.layout = null
    this.drawn = ""
    this.version = 0  // bumped when the patch changes: views down the scene chain redraw
    this.listen()
    new ResizeObserver(() => this.redraw()).observe(this.element)
    this.prepare()
    this.start()
  }

  /** Polling (upstream images, values set without a callback, the graph's zoom) runs while the node is in a graph. */
  start() {
    this.timer ??= setInterval(() => this.poll(), 250)
  }

  stop() {
    clearInterval(this.timer)
    this.timer = null
  }

  // -- widgets
  params() {
    const p = {}
    for (const name of PARAMS) {
      const v = Number(widgetOf(this.node, name)?.value)
      p[name] = Number.isFinite(v) ? v : DEFAULTS[name]
    }
    if (!(p.scale > 0)) p.scale = DEFAULTS.scale
    return p
  }

  write(values) {
    for (const [name, value] of Object.entries(values)) {
      const w = widgetOf(this.node, name)
      if (!w) continue
      const v = M.tidy(name, value)
      if (w.value === v) continue
      w.value = v
      w.callback?.call(w, w.value, app.canvas, this.node)  // the widget's own rounding (FLOAT precision)
    }
    this.node.setDirtyCanvas?.(true, true)
    this.redraw()
  }

  // -- images
  /** role -> {url, channel, key} of what the view can show; this.wanted: what it cannot, and why. */
  sources() {
    const out = {}, wanted = []
    const chain = typeOf(this.node) === ADD ? sceneChain(this.node) : null
    if (typeOf(this.node) === ADD && !chain) wanted.push({ role: "scene", why: "unlinked" })
    for (const role of ROLES) {
      let up, via
      if (role === "target" && typeOf(this.node) === ADD) {
        up = chain && upstream(chain.at(-1), "target")
        via = chain && feeding(chain.at(-1), "target")
      } else {
        up = upstream(this.node, role)
        via = feeding(this.node, role)
      }
      if (up) out[role] = { ...up, key: `${up.url}|${up.channel}` }
      else if (this.lastRun?.[role]) {
        out[role] = { url: this.lastRun[role], channel: role === "source_mask" ? "red" : null, key: `${this.lastRun[role]}|run` }
      } else if (via) wanted.push({ role, why: "run", from: titleOf(via.origin) })
      else if (role !== "target" || chain || typeOf(this.node) === EDIT) wanted.push({ role, why: "unlinked" })
    }
    this.wanted = wanted
    return out
  }

  poll() {
    if (this.node.graph) this.attached = true
    else if (this.attached) return this.stop()  // removed with its graph (a workflow closed or replaced)
    const wanted = JSON.stringify(this.wanted)
    const sources = this.sources()
    let changed = JSON.stringify(this.wanted) !== wanted
    for (const role of ROLES) {
      const src = sources[role]
      if ((this.inputs[role]?.key ?? null) === (src?.key ?? null)) continue
      changed = true
      if (!src) { delete this.inputs[role]; continue }
      const entry = { key: src.key, channel: src.channel, data: null, error: null }
      this.inputs[role] = entry
      pixels(src.url).then((data) => {
        if (this.inputs[role] !== entry) return
        entry.data = data
        this.prepare()
      }, (error) => { if (this.inputs[role] === entry) { entry.error = String(error); this.prepare() } })
    }
    if (changed) this.prepare()
    this.redraw()
  }

  /** The patch (source RGB, alpha = the binarised mask, cut to the mask's box), the anchor, the outline and what the
   *  box over the view says, once per input set. */
  prepare() {
    this.patch = null
    this.version++
    let notice = null
    const src = this.inputs.source?.data, mask = this.inputs.source_mask?.data, tgt = this.inputs.target?.data
    const unlinked = this.wanted.filter((w) => w.why === "unlinked"), run = this.wanted.filter((w) => w.why === "run")
    if (unlinked.length) {
      const item = (role) => (role === "target" && typeOf(this.node) === ADD
        ? `${WANTED.target}, on the <i>Geometry Image Edit</i> the scene starts from` : WANTED[role])
      notice = { title: "Connect to place the geometry here:", items: unlinked.map((w) => item(w.role)),
                 foot: "The shift, scale and rotation widgets above work without the view." }
    } else if (run.length) {
      notice = { title: "Run the graph once to see the placement:",
                 items: run.map((w) => `<b>${w.role}</b> comes from <i>${html(w.from)}</i>, not from a file: the view ` +
                   "shows what the node received in its last run"),
                 foot: "The shift, scale and rotation widgets above work without the view." }
    } else if (ROLES.some((r) => this.inputs[r]?.error)) {
      notice = { title: "Could not load the input images.", foot: "Run the graph once to preview them." }
    } else if (!src || !mask || !tgt) {
      notice = { title: "Loading the images..." }
    } else if (src.width !== mask.width || src.height !== mask.height) {
      notice = { title: `The mask is ${mask.width}x${mask.height} but the source is ${src.width}x${src.height}.`,
                 foot: "Resize the mask to the image, or paint the mask on the source itself (MaskEditor)." }
    } else {
      const region = M.maskFromRGBA(mask.data, mask.width, mask.height, this.inputs.source_mask.channel)
      const bbox = M.maskBBox(region, mask.width, mask.height)
      if (!bbox) {
        notice = { title: "The source mask is empty (no value at 0.5 or more).",
                   items: [WANTED.source_mask, "or connect a mask that is white where the geometry is"] }
      } else {
        this.patch = {
          ...cutPatch(src, region, bbox), bbox, anchor: M.anchorOf(bbox), outline: M.maskOutline(region, src.width, src.height),
          src: { width: src.width, height: src.height }, tgt: { width: tgt.width, height: tgt.height },
        }
      }
    }
    this.message = notice && [notice.title, ...(notice.items ?? []), notice.foot ?? ""].join(" ").replace(/<[^>]+>/g, "").trim()
    this.notice.innerHTML = notice ? `<div style="font-weight:600;margin-bottom:${notice.items ? 4 : 0}px">${notice.title}</div>` +
      (notice.items ? `<ul style="margin:0 0 0 1.1em;padding:0">${notice.items.map((i) => `<li>${i}</li>`).join("")}</ul>` : "") +
      (notice.foot ? `<div style="margin-top:6px;color:#a8a8a8">${notice.foot}</div>` : "") : ""
    this.notice.style.display = notice ? "block" : "none"
    this.drawn = ""
    this.redraw()
  }

  // -- geometry in CSS px of the view
  computeLayout(w, h) {
    const tgt = this.inputs.target?.data
    if (!tgt || w <= 2 * PAD || h <= 2 * PAD) return null
    const k = Math.min((w - 2 * PAD) / tgt.width, (h - 2 * PAD) / tgt.height)
    return { w, h, k, ox: (w - k * tgt.width) / 2, oy: (h - k * tgt.height) / 2 }
  }

  /** Target pixel-centre coordinates to view CSS px, and back. */
  toView([x, y]) { const L = this.layout; return [L.ox + L.k * (x + 0.5), L.oy + L.k * (y + 0.5)] }
  fromView([u, v]) { const L = this.layout; return [(u - L.ox) / L.k - 0.5, (v - L.oy) / L.k - 0.5] }

  /** The patch's box, its handles and anchor in view px for placement p. The handle frame lies CLEAR px outside the
   *  box along the patch's own axes, so a patch drawn small keeps every one of its pixels in sight. */
  handles(p) {
    const P = this.patch
    const { x0, y0, x1, y1 } = P.bbox
    const at = (q) => this.toView(M.forward(P.anchor, P.src, P.tgt, p, q))
    const box = [[x0 - 0.5, y0 - 0.5], [x1 + 0.5, y0 - 0.5], [x1 + 0.5, y1 + 0.5], [x0 - 0.5, y1 + 0.5]].map(at)
    const anchor = this.toView(M.landing(P.anchor, P.src, P.tgt, p))
    const unit = (q) => {
      const [u, v] = at(q), n = Math.hypot(u - anchor[0], v - anchor[1]) || 1
      return [(u - anchor[0]) / n, (v - anchor[1]) / n]
    }
    const ux = unit([P.anchor[0] + 1, P.anchor[1]]), uy = unit([P.anchor[0], P.anchor[1] + 1])  // the patch's x, y on screen
    const out = [[-1, -1], [1, -1], [1, 1], [-1, 1]].map(([sx, sy]) => [CLEAR * (sx * ux[0] + sy * uy[0]),
                                                                        CLEAR * (sx * ux[1] + sy * uy[1])])
    const corners = box.map(([u, v], i) => [u + out[i][0], v + out[i][1]])
    const top = [(corners[0][0] + corners[1][0]) / 2, (corners[0][1] + corners[1][1]) / 2]
    const rotate = [top[0] - ARM * uy[0], top[1] - ARM * uy[1]]
    return { box, corners, out, anchor, top, rotate }
  }

  eventPoint(e) {
    const r = this.canvas.getBoundingClientRect()
    // the element may be CSS-scaled with the graph's zoom: client px -> view CSS px
    return [(e.clientX - r.left) * this.canvas.clientWidth / r.width, (e.clientY - r.top) * this.canvas.clientHeight / r.height]
  }

  hit(pt) {
    if (!this.patch || !this.layout) return null
    const p = this.params(), H = this.handles(p)
    const dist = (q) => Math.hypot(pt[0] - q[0], pt[1] - q[1])
    if (dist(H.rotate) <= HANDLE + 4) return "rotate"
    // a corner, unless the pointer is nearer the anchor (a patch drawn very small): then it moves
    const corner = Math.min(...H.corners.map(dist))
    if (corner <= HANDLE + 4 && corner < dist(H.anchor)) return "scale"
    // inside the handle frame: the patch's box and the clear margin around it
    const [a, b, c] = H.corners, ex = [b[0] - a[0], b[1] - a[1]], ey = [c[0] - b[0], c[1] - b[1]]
    const s = ((pt[0] - a[0]) * ex[0] + (pt[1] - a[1]) * ex[1]) / (ex[0] ** 2 + ex[1] ** 2)
    const t = ((pt[0] - b[0]) * ey[0] + (pt[1] - b[1]) * ey[1]) / (ey[0] ** 2 + ey[1] ** 2)
    return s >= 0 && s <= 1 && t >= 0 && t <= 1 ? "move" : null
  }

  // -- input
  listen() {
    const c = this.canvas
    const stop = (e) => { e.stopPropagation() }
    c.addEventListener("pointerdown", (e) => {
      stop(e)
      c.focus({ preventScroll: true })
      const pt = this.eventPoint(e), what = this.hit(pt)
      if (!what || e.button !== 0) return
      e.preventDefault()
      c.setPointerCapture?.(e.pointerId)
      const p = this.params(), H = this.handles(p)
      const dist = (q) => Math.hypot(pt[0] - q[0], pt[1] - q[1])
      const corner = H.corners.indexOf(H.corners.reduce((best, q) => (dist(q) < dist(best) ? q : best)))
      this.drag = { what, start: pt, p, anchor: H.anchor, k: this.layout.k, corner,
                    // the grabbed corner of the box per unit of scale, and the frame's offset from it (view px)
                    unit: [(H.box[corner][0] - H.anchor[0]) / p.scale, (H.box[corner][1] - H.anchor[1]) / p.scale],
                    out: H.out[corner] }
      this.redraw()
    })
    c.addEventListener("pointermove", (e) => {
      stop(e)
      const pt = this.eventPoint(e)
      if (!this.drag) {
        const what = this.hit(pt)
        c.style.cursor = { move: "move", scale: "nwse-resize", rotate: "grab" }[what] ?? "default"
        return
      }
      const D = this.drag, [ax, ay] = D.anchor
      if (D.what === "move") {
        this.write({ shift_x: D.p.shift_x + (pt[0] - D.start[0]) / D.k, shift_y: D.p.shift_y + (pt[1] - D.start[1]) / D.k })
      } else if (D.what === "scale") {
        // the scale that puts the grabbed handle nearest the pointer, along the box's diagonal
        const [wx, wy] = D.unit, [qx, qy] = [pt[0] - ax - D.out[0], pt[1] - ay - D.out[1]]
        const s = (qx * wx + qy * wy) / (wx * wx + wy * wy)
        if (s > 0) this.write({ scale: s })
      } else {
        // screen y points down: counter-clockwise on screen is a decreasing atan2 angle
        const a0 = Math.atan2(D.start[1] - ay, D.start[0] - ax), a1 = Math.atan2(pt[1] - ay, pt[0] - ax)
        this.write({ rotation: D.p.rotation - (a1 - a0) * 180 / Math.PI })
      }
    })
    const end = (e) => {
      stop(e)
      if (!this.drag) return
      this.drag = null
      c.releasePointerCapture?.(e.pointerId)
      this.redraw()
      this.changed()
    }
    c.addEventListener("pointerup", end)
    c.addEventListener("pointercancel", end)
    c.addEventListener("wheel", (e) => {
      if (this.hit(this.eventPoint(e)) === null) return  // elsewhere the wheel zooms the graph as usual
      e.preventDefault()
      stop(e)
      const p = this.params()
      this.write({ scale: p.scale * Math.exp(-e.deltaY * 0.0015) })
      this.changed()
    }, { passive: false })
    c.addEventListener("dblclick", (e) => {
      stop(e)
      e.preventDefault()
      this.write(DEFAULTS)
      this.changed()
    })
    c.addEventListener("keydown", (e) => {
      const step = e.shiftKey ? 10 : 1
      const move = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] }[e.key]
      if (!move) return
      stop(e)
      e.preventDefault()
      const p = this.params()
      this.write({ shift_x: p.shift_x + move[0], shift_y: p.shift_y + move[1] })
      this.changed()
    })
    for (const type of ["contextmenu", "click", "mousedown", "keyup"]) c.addEventListener(type, stop)
  }

  /** The workflow's undo / modified state sees a finished gesture. */
  changed() {
    try {
      const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker
      ;(tracker?.captureCanvasState ?? tracker?.checkState)?.call(tracker)  // the name since 1.4x, and before
    } catch {
      // an older frontend without the change tracker: nothing to tell
    }
  }

  // -- drawing
  /** The HA nodes placed before this one in its scene chain, first first, with their patches and placements. */
  earlier() {
    if (typeOf(this.node) !== ADD) return []
    return (sceneChain(this.node) ?? []).reverse().map((n) => n.haPlacement).filter((v) => v?.patch)
      .map((v) => ({ patch: v.patch, p: v.params(), version: v.version }))
  }

  /** The view's drawing resolution: device px per view CSS px (device pixel ratio x the graph's zoom), capped. */
  resolution(w, h) {
    const r = this.canvas.getBoundingClientRect()
    const zoom = w > 0 && r.width > 0 ? r.width / w : 1
    return Math.max(0.25, Math.min((window.devicePixelRatio || 1) * zoom, MAX_BACKING / Math.max(w, h, 1)))
  }

  redraw() {
    if (!this.element.isConnected) return
    this.fitHint()
    const w = this.canvas.clientWidth, h = this.canvas.clientHeight, R = this.resolution(w, h)
    const p = this.params(), earlier = this.earlier()
    const key = JSON.stringify([p, w, h, R, this.version, !!this.inputs.target?.data, !!this.drag,
                                earlier.map((e) => [e.p, e.version])])
    if (key === this.drawn) return
    this.drawn = key
    const bw = Math.round(w * R), bh = Math.round(h * R)
    if (this.canvas.width !== bw || this.canvas.height !== bh) {
      this.canvas.width = bw
      this.canvas.height = bh
    }
    const ctx = this.canvas.getContext("2d")
    ctx.setTransform(1, 0, 0, 1, 0, 0)
    ctx.clearRect(0, 0, bw, bh)
    this.layout = this.computeLayout(w, h)
    if (!this.layout) return
    ctx.drawImage(this.base(bw, bh, R, earlier), 0, 0)
    ctx.setTransform(R, 0, 0, R, 0, 0)
    if (this.patch) this.drawPatch(ctx, p, R)
  }

  /** The target and the earlier geometries (dimmed), at the backing store's size: redrawn only when they change,
   *  not on every step of a gesture. */
  base(bw, bh, R, earlier) {
    const L = this.layout, key = JSON.stringify([bw, bh, L, this.inputs.target.key, earlier.map((e) => [e.p, e.version])])
    if (this.baseLayer?.key === key) return this.baseLayer.canvas
    const canvas = this.baseLayer?.canvas ?? document.createElement("canvas")
    canvas.width = bw
    canvas.height = bh
    const ctx = canvas.getContext("2d")
    ctx.setTransform(R, 0, 0, R, 0, 0)
    const tgt = this.inputs.target.data
    ctx.imageSmoothingEnabled = L.k * R < 2  // magnified: whole target pixels, crisp
    ctx.imageSmoothingQuality = "high"
    ctx.drawImage(opaqueCanvas(tgt), L.ox, L.oy, L.k * tgt.width, L.k * tgt.height)
    for (const e of earlier) this.drawGeometry(ctx, e.patch, e.p, R, { alpha: EARLIER_ALPHA, rim: "rgba(255,255,255,0.6)" })
    this.baseLayer = { key, canvas }
    return canvas
  }

  /** One geometry: its M_geo outline as a rim, then the patch over it, so the rim shows only outside the patch and
   *  never covers its pixels. Clipped to the target: what lies off the canvas is not part of the result. */
  drawGeometry(ctx, P, p, R, { alpha = 1, rim = OUTLINE } = {}) {
    const L = this.layout
    const [a, b, c, d, e, f] = M.edgeAffine(P.anchor, P.src, P.tgt, p)
    ctx.save()
    ctx.beginPath()
    ctx.rect(L.ox, L.oy, L.k * P.tgt.width, L.k * P.tgt.height)
    ctx.clip()
    ctx.globalAlpha = alpha
    const edge = ([x, y]) => [L.ox + L.k * (a * x + c * y + e), L.oy + L.k * (b * x + d * y + f)]
    ctx.beginPath()
    for (const [x0, y0, x1, y1] of P.outline) {
      ctx.moveTo(...edge([x0, y0]))
      ctx.lineTo(...edge([x1, y1]))
    }
    ctx.strokeStyle = rim
    ctx.lineWidth = 3
    ctx.lineCap = "square"
    ctx.stroke()
    // view = offset + k * (target edge coordinates); the patch canvas starts at the mask box's corner
    ctx.transform(L.k * a, L.k * b, L.k * c, L.k * d, L.ox + L.k * e, L.oy + L.k * f)
    ctx.imageSmoothingEnabled = L.k * p.scale * R < 2
    ctx.drawImage(P.canvas, P.x, P.y)
    ctx.restore()
  }

  drawPatch(ctx, p, R) {
    this.drawGeometry(ctx, this.patch, p, R)
    const H = this.handles(p)
    ctx.save()
    ctx.beginPath()
    H.corners.forEach(([u, v], i) => (i ? ctx.lineTo(u, v) : ctx.moveTo(u, v)))
    ctx.closePath()
    ctx.moveTo(...H.top)
    ctx.lineTo(...H.rotate)
    ctx.setLineDash([4, 3])
    ctx.strokeStyle = "rgba(255,255,255,0.9)"
    ctx.lineWidth = 1
    ctx.stroke()
    ctx.setLineDash([])
    ctx.fillStyle = "#ffffff"
    ctx.strokeStyle = "#202020"
    for (const [u, v] of H.corners) {
      ctx.fillRect(u - HANDLE, v - HANDLE, 2 * HANDLE, 2 * HANDLE)
      ctx.strokeRect(u - HANDLE, v - HANDLE, 2 * HANDLE, 2 * HANDLE)
    }
    ctx.beginPath()
    ctx.arc(H.rotate[0], H.rotate[1], HANDLE + 1, 0, 2 * Math.PI)
    ctx.fill()
    ctx.stroke()
    if (this.drag && this.drag.what !== "move") {  // the pivot, while scaling or rotating about it
      const [u, v] = H.anchor
      ctx.beginPath()
      ctx.moveTo(u - 5, v)
      ctx.lineTo(u + 5, v)
      ctx.moveTo(u, v - 5)
      ctx.lineTo(u, v + 5)
      ctx.strokeStyle = OUTLINE
      ctx.lineWidth = 1.5
      ctx.stroke()
    }
    ctx.restore()
  }

  /** The longest instruction that fits on one line. */
  fitHint() {
    const width = this.hint.clientWidth - 16
    if (width === this.hintWidth) return
    this.hintWidth = width
    measure ??= document.createElement("canvas").getContext("2d")
    measure.font = getComputedStyle(this.hint).font || "11.5px sans-serif"
    this.hint.textContent = HINTS.find((t) => measure.measureText(t).width <= width) ?? HINTS.at(-1)
  }

  /** Target positions of source points (pixel-centre coordinates) under the placement the view shows. */
  forward(points) {
    const P = this.patch, p = this.params()
    return P ? points.map((q) => M.forward(P.anchor, P.src, P.tgt, p, q)) : null
  }

  /** The RGBA values the canvas shows at target points (pixel-centre coordinates): what the browser tests check. */
  shownAt(points) {
    this.redraw()
    if (!this.layout) return null
    const ctx = this.canvas.getContext("2d"), sx = this.canvas.width / this.canvas.clientWidth
    return points.map((q) => {
      const [u, v] = this.toView(q)
      return Array.from(ctx.getImageData(Math.floor(u * sx), Math.floor(v * sx), 1, 1).data)
    })
  }

  /** Client (page) coordinates of the view's landmarks: what the browser tests drag. */
  describe() {
    this.redraw()
    const r = this.canvas.getBoundingClientRect()
    const canvas = { css: [r.width, r.height], backing: [this.canvas.width, this.canvas.height],
                     dpr: window.devicePixelRatio || 1, hint: this.hint.textContent,
                     notice: this.notice.style.display !== "none" }
    if (!this.patch || !this.layout) return { ready: false, message: this.message, canvas }
    const sx = r.width / this.canvas.clientWidth
    const client = ([u, v]) => [r.left + u * sx, r.top + v * sx]
    const p = this.params(), H = this.handles(p), P = this.patch
    return {
      ready: true, params: p, clientPerTargetPx: this.layout.k * sx, canvas,
      anchor: client(H.anchor), corners: H.corners.map(client), box: H.box.map(client), rotate: client(H.rotate),
      source: P.src, target: P.tgt, sourceAnchor: P.anchor, bbox: P.bbox,
    }
  }
}

/** The source's colours where the mask is set, transparent elsewhere, on a canvas the size of the mask's box. */
function cutPatch(src, region, { x0, y0, x1, y1 }) {
  const w = x1 - x0 + 1, h = y1 - y0 + 1
  const canvas = document.createElement("canvas")
  canvas.width = w
  canvas.height = h
  const ctx = canvas.getContext("2d")
  const img = ctx.createImageData(w, h)
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = (y0 + y) * src.width + x0 + x, o = 4 * (y * w + x)
      img.data[o] = src.data[4 * i]
      img.data[o + 1] = src.data[4 * i + 1]
      img.data[o + 2] = src.data[4 * i + 2]
      img.data[o + 3] = region[i] ? 255 : 0
    }
  }
  ctx.putImageData(img, 0, 0)
  return { canvas, x: x0, y: y0 }
}

const html = (text) => String(text).replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch])

/** The view's least height for a node `width` wide: the target (square, or as wide as its aspect asks) across the
 *  node's width, and the instruction line. */
function minHeight(node) {
  const tgt = node.haPlacement?.inputs.target?.data
  const aspect = tgt ? Math.min(1, tgt.height / tgt.width) : 1
  return Math.max(MIN_STAGE, Math.round((node.size[0] - 2 * WIDGET_MARGIN - 2 * PAD) * aspect + 2 * PAD)) + HINT_HEIGHT +
    WIDGET_SLACK
}

// ------------------------------------------------------------------ registration

app.registerExtension({
  name: "harmonizing_attention.placement",
  nodeCreated(node) {
    if (!NODES.has(typeOf(node)) || !node.addDOMWidget) return
    const view = new PlacementView(node)
    node.haPlacement = view
    addViewWidget(node, "placement", "ha_placement", view.element, { hideOnZoom: false, getMinHeight: () => minHeight(node) })
    // typing a value moves the overlay at once
    for (const name of PARAMS) {
      const w = widgetOf(node, name)
      if (!w) continue
      const callback = w.callback
      w.callback = function (...args) {
        const out = callback?.apply(this, args)
        view.redraw()
        return out
      }
    }
    chain(node, "onExecuted", (output) => {
      const items = output?.ha_placement
      if (Array.isArray(items)) {
        view.lastRun = Object.fromEntries(items.filter((i) => i?.role).map((i) =>
          [i.role, api.apiURL(`/view?${new URLSearchParams({ filename: i.filename, type: i.type, subfolder: i.subfolder ?? "" })}`)]))
        view.poll()
      }
    })
    chain(node, "onRemoved", () => view.stop())
    chain(node, "onAdded", () => view.start())
    // room for the view, also when a saved workflow (configure) brings the node's old, smaller size
    const fit = () => {
      const [w, h] = node.size
      const min = node.computeSize?.() ?? [w, h]
      if (w < min[0] || h < min[1]) node.setSize?.([Math.max(w, min[0]), Math.max(h, min[1])])
    }
    chain(node, "onConfigure", fit)
    // a new node: wide enough for a view one can place by the pixel (a loaded one gets its saved size next)
    if (node.size[0] < NODE_WIDTH) node.size[0] = NODE_WIDTH
    fit()
    view.poll()
  },
})
