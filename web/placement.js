// The placement view of HA_GeometryImageEdit and HA_AddGeometry: the target image with the source patch (cut by its mask)
// drawn where shift_x / shift_y / scale / rotation put it, and the outline of M_geo. Drag the patch to move
// it, a corner handle (or the wheel over the patch) to scale, the round handle to rotate; arrow keys nudge
// by one target pixel (Shift: ten); double-click resets. Every gesture writes those four widgets and
// nothing else: the view itself is not serialised (not in widgets_values, not in the API prompt).
//
// Images: from the upstream LoadImage / LoadImageMask nodes (their files, as the nodes read them; a
// HA_AddGeometry's target is the one its scene chain starts from, at the HA_GeometryImageEdit), else from the
// node's last run (its ui output "ha_placement"), else a placeholder.
import { app } from "../../scripts/app.js"
import { api } from "../../scripts/api.js"
import * as M from "./placement_math.js"

const EDIT = "HA_GeometryImageEdit", ADD = "HA_AddGeometry"
const NODES = new Set([EDIT, ADD])  // both place a source on the target with the same four widgets
const PARAMS = ["shift_x", "shift_y", "scale", "rotation"]
const DEFAULTS = { shift_x: 0, shift_y: 0, scale: 1, rotation: 0 }
const ROLES = ["source", "source_mask", "target"]
const PAD = 16  // CSS px around the target inside the view
const HANDLE = 5  // CSS px: half the side of a corner handle
const ARM = 22  // CSS px from the box's top edge to the rotation handle
const MIN_HEIGHT = 220
const OUTLINE = "#ffd400"

// ------------------------------------------------------------------ images

const pixelCache = new Map()  // url -> Promise<{width, height, data, canvas}>

async function loadPixels(url) {
  const response = await fetch(url, { cache: "no-cache" })
  if (!response.ok) throw new Error(`${response.status} for ${url}`)
  // raw file values, as PIL reads them: no colour management, no premultiplication
  const bitmap = await createImageBitmap(await response.blob(),
    { colorSpaceConversion: "none", premultiplyAlpha: "none" })
  const canvas = document.createElement("canvas")
  canvas.width = bitmap.width
  canvas.height = bitmap.height
  const ctx = canvas.getContext("2d", { willReadFrequently: true })
  ctx.drawImage(bitmap, 0, 0)
  bitmap.close?.()
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data
  return { width: canvas.width, height: canvas.height, data, canvas }
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

/** /view URL of an image widget's value ("sub/name.png [input]"). */
function viewURL(value, type = "input") {
  const m = /^(.*) \[(input|output|temp)\]$/.exec(value)
  if (m) [value, type] = [m[1], m[2]]
  const i = value.lastIndexOf("/")
  const params = new URLSearchParams({ filename: value.slice(i + 1), type, subfolder: i >= 0 ? value.slice(0, i) : "" })
  return api.apiURL(`/view?${params}`)
}

const widgetOf = (node, name) => node?.widgets?.find((w) => w.name === name)
const typeOf = (node) => node?.constructor?.comfyClass ?? node?.comfyClass ?? node?.type

/** {origin, link} of the node feeding an input, unless missing, muted or bypassed. */
function feeding(node, inputName) {
  const slot = (node.inputs ?? []).findIndex((input) => input.name === inputName)
  if (slot < 0 || node.inputs[slot].link == null) return null
  const link = node.getInputLink?.(slot)
  const origin = node.getInputNode?.(slot)
  return !link || !origin || origin.mode === 2 || origin.mode === 4 ? null : { origin, link }
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

/** {url, channel} of the target file a HA_AddGeometry's scene carries: up the chain of HA_AddGeometry nodes
 *  to the HA_GeometryImageEdit that made the scene, then its target's LoadImage. */
function sceneTarget(node) {
  const seen = new Set()
  for (let n = feeding(node, "scene")?.origin; n && !seen.has(n); n = feeding(n, "scene")?.origin) {
    seen.add(n)
    if (typeOf(n) === EDIT) return upstream(n, "target")
    if (typeOf(n) !== ADD) return null
  }
  return null
}

// ------------------------------------------------------------------ the view

class PlacementView {
  constructor(node) {
    this.node = node
    this.element = document.createElement("div")
    this.element.className = "ha-placement"
    Object.assign(this.element.style, {
      position: "relative", minHeight: `${MIN_HEIGHT}px`, width: "100%", height: "100%",
      overflow: "hidden", borderRadius: "4px", background: "#1b1b1b",
    })
    this.canvas = document.createElement("canvas")
    this.canvas.tabIndex = 0
    this.canvas.title = "Drag: move. Corner: scale (or wheel over the patch). Round handle: rotate. " +
      "Arrows: 1 px (Shift: 10). Double-click: reset."
    Object.assign(this.canvas.style, { position: "absolute", inset: "0", width: "100%", height: "100%",
      outline: "none", touchAction: "none", cursor: "default" })
    this.element.appendChild(this.canvas)
    this.inputs = {}  // role -> {key, data | null, error}
    this.lastRun = null  // role -> url, from the node's last execution
    this.drag = null
    this.layout = null
    this.drawn = ""
    this.listen()
    new ResizeObserver(() => this.redraw()).observe(this.element)
    this.start()
  }

  /** Polling (upstream images, values set without a callback) runs while the node is in a graph. */
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
  sources() {
    const out = {}
    for (const role of ROLES) {
      const up = role === "target" && typeOf(this.node) === ADD ? sceneTarget(this.node) : upstream(this.node, role)
      if (up) out[role] = { ...up, key: `${up.url}|${up.channel}` }
      else if (this.lastRun?.[role]) out[role] = { url: this.lastRun[role], channel: role === "source_mask" ? "red" : null,
                                                  key: `${this.lastRun[role]}|run` }
    }
    return out
  }

  poll() {
    if (this.node.graph) this.attached = true
    else if (this.attached) return this.stop()  // removed with its graph (a workflow closed or replaced)
    if (!this.element.isConnected) return
    const sources = this.sources()
    let changed = false
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

  /** The patch (source RGB, alpha = the binarised mask), the anchor and the outline, once per input set. */
  prepare() {
    this.patch = null
    this.message = null
    const src = this.inputs.source?.data, mask = this.inputs.source_mask?.data, tgt = this.inputs.target?.data
    const missing = ROLES.filter((r) => !this.inputs[r])
    if (missing.length) {
      this.message = `No ${missing.join(", ")} image yet: connect LoadImage / LoadImageMask nodes, or run the graph ` +
        "once, to place the geometry here. The widgets below work as they are."
    } else if (ROLES.some((r) => this.inputs[r].error)) {
      this.message = "Could not load the input images: run the graph once to preview them."
    } else if (!src || !mask || !tgt) {
      this.message = "Loading the images..."
    } else if (src.width !== mask.width || src.height !== mask.height) {
      this.message = `The mask is ${mask.width}x${mask.height} but the source is ${src.width}x${src.height}: ` +
        "resize the mask to the image."
    } else {
      const region = M.maskFromRGBA(mask.data, mask.width, mask.height, this.inputs.source_mask.channel)
      const bbox = M.maskBBox(region, mask.width, mask.height)
      if (!bbox) {
        this.message = "The source mask is empty (no value >= 0.5): paint the region to transfer."
      } else {
        const cut = document.createElement("canvas")
        cut.width = src.width
        cut.height = src.height
        const ctx = cut.getContext("2d")
        const img = ctx.createImageData(src.width, src.height)
        for (let i = 0; i < region.length; i++) {
          img.data[4 * i] = src.data[4 * i]
          img.data[4 * i + 1] = src.data[4 * i + 1]
          img.data[4 * i + 2] = src.data[4 * i + 2]
          img.data[4 * i + 3] = region[i] ? 255 : 0
        }
        ctx.putImageData(img, 0, 0)
        this.patch = {
          canvas: cut, bbox, anchor: M.anchorOf(bbox), outline: M.maskOutline(region, src.width, src.height),
          src: { width: src.width, height: src.height }, tgt: { width: tgt.width, height: tgt.height },
        }
      }
    }
    this.drawn = ""
    this.redraw()
  }

  // -- geometry in CSS px of the view
  computeLayout() {
    const w = this.element.clientWidth, h = this.element.clientHeight
    const tgt = this.inputs.target?.data
    if (!tgt || w <= 2 * PAD || h <= 2 * PAD) return null
    const k = Math.min((w - 2 * PAD) / tgt.width, (h - 2 * PAD) / tgt.height)
    return { w, h, k, ox: (w - k * tgt.width) / 2, oy: (h - k * tgt.height) / 2 }
  }

  /** Target pixel-centre coordinates to view CSS px, and back. */
  toView([x, y]) { const L = this.layout; return [L.ox + L.k * (x + 0.5), L.oy + L.k * (y + 0.5)] }
  fromView([u, v]) { const L = this.layout; return [(u - L.ox) / L.k - 0.5, (v - L.oy) / L.k - 0.5] }

  /** Handles and anchor in view px for placement p. */
  handles(p) {
    const P = this.patch
    const { x0, y0, x1, y1 } = P.bbox
    const corner = ([x, y]) => this.toView(M.forward(P.anchor, P.src, P.tgt, p, [x, y]))
    const corners = [[x0 - 0.5, y0 - 0.5], [x1 + 0.5, y0 - 0.5], [x1 + 0.5, y1 + 0.5], [x0 - 0.5, y1 + 0.5]].map(corner)
    const anchor = this.toView(M.landing(P.anchor, P.src, P.tgt, p))
    const top = corner([P.anchor[0], y0 - 0.5])
    // "up" in the patch's rotated frame, on screen: R (0, -1) = (-sin, -cos)
    const th = p.rotation * Math.PI / 180
    const rotate = [top[0] - ARM * Math.sin(th), top[1] - ARM * Math.cos(th)]
    return { corners, anchor, top, rotate }
  }

  eventPoint(e) {
    const r = this.canvas.getBoundingClientRect()
    // the element may be CSS-scaled with the graph's zoom: client px -> view CSS px
    return [(e.clientX - r.left) * this.element.clientWidth / r.width, (e.clientY - r.top) * this.element.clientHeight / r.height]
  }

  hit(pt) {
    if (!this.patch || !this.layout) return null
    const p = this.params(), H = this.handles(p)
    const dist = (q) => Math.hypot(pt[0] - q[0], pt[1] - q[1])
    if (dist(H.rotate) <= HANDLE + 4) return "rotate"
    // a corner, unless the patch is so small on screen that the pointer is nearer its anchor: then it moves
    const corner = Math.min(...H.corners.map(dist))
    if (corner <= HANDLE + 4 && corner < dist(H.anchor)) return "scale"
    const P = this.patch
    const [sx, sy] = M.inverse(P.anchor, P.src, P.tgt, p, this.fromView(pt))
    const { x0, y0, x1, y1 } = P.bbox
    if (sx >= x0 - 0.5 && sx <= x1 + 0.5 && sy >= y0 - 0.5 && sy <= y1 + 0.5) return "move"
    return null
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
      const p = this.params()
      this.drag = { what, start: pt, p, anchor: this.handles(p).anchor, k: this.layout.k }
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
        const r0 = Math.hypot(D.start[0] - ax, D.start[1] - ay), r1 = Math.hypot(pt[0] - ax, pt[1] - ay)
        if (r0 > 0) this.write({ scale: D.p.scale * r1 / r0 })
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
  redraw() {
    if (!this.element.isConnected) return
    const p = this.params()
    const dpr = window.devicePixelRatio || 1
    const w = this.element.clientWidth, h = this.element.clientHeight
    const key = JSON.stringify([p, w, h, dpr, this.patch ? 1 : 0, this.message, !!this.inputs.target?.data])
    if (key === this.drawn) return
    this.drawn = key
    if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(h * dpr)) {
      this.canvas.width = Math.round(w * dpr)
      this.canvas.height = Math.round(h * dpr)
    }
    const ctx = this.canvas.getContext("2d")
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0)
    ctx.clearRect(0, 0, w, h)
    this.layout = this.computeLayout()
    const tgt = this.inputs.target?.data
    if (this.layout && tgt) {
      const L = this.layout
      ctx.imageSmoothingEnabled = true
      ctx.drawImage(tgt.canvas, L.ox, L.oy, L.k * tgt.width, L.k * tgt.height)
    }
    if (this.patch && this.layout) this.drawPatch(ctx, p, dpr)
    if (this.message) this.drawMessage(ctx, w, h)
  }

  drawPatch(ctx, p, dpr) {
    const P = this.patch, L = this.layout
    const [a, b, c, d, e, f] = M.edgeAffine(P.anchor, P.src, P.tgt, p)
    // view = offset + k * (target edge coordinates)
    ctx.save()
    ctx.beginPath()
    ctx.rect(L.ox, L.oy, L.k * P.tgt.width, L.k * P.tgt.height)
    ctx.clip()  // what lies off the target canvas is not part of the result
    ctx.setTransform(dpr * L.k * a, dpr * L.k * b, dpr * L.k * c, dpr * L.k * d, dpr * (L.ox + L.k * e), dpr * (L.oy + L.k * f))
    ctx.imageSmoothingEnabled = true
    ctx.drawImage(P.canvas, 0, 0)
    ctx.restore()

    // M_geo's outline: the mask's pixel edges under T
    const edge = ([x, y]) => [L.ox + L.k * (a * x + c * y + e), L.oy + L.k * (b * x + d * y + f)]
    ctx.save()
    ctx.beginPath()
    for (const [x0, y0, x1, y1] of P.outline) {
      const [u0, v0] = edge([x0, y0]), [u1, v1] = edge([x1, y1])
      ctx.moveTo(u0, v0)
      ctx.lineTo(u1, v1)
    }
    ctx.strokeStyle = OUTLINE
    ctx.lineWidth = 1.25
    ctx.stroke()

    const H = this.handles(p)
    ctx.beginPath()
    H.corners.forEach(([u, v], i) => (i ? ctx.lineTo(u, v) : ctx.moveTo(u, v)))
    ctx.closePath()
    ctx.moveTo(...H.top)
    ctx.lineTo(...H.rotate)
    ctx.setLineDash([4, 3])
    ctx.strokeStyle = "rgba(255,255,255,0.85)"
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
    ctx.beginPath()
    ctx.arc(H.anchor[0], H.anchor[1], 2.5, 0, 2 * Math.PI)
    ctx.fillStyle = OUTLINE
    ctx.fill()
    ctx.restore()
  }

  drawMessage(ctx, w, h) {
    ctx.save()
    ctx.fillStyle = "#bbbbbb"
    ctx.font = "12px sans-serif"
    ctx.textAlign = "center"
    ctx.textBaseline = "middle"
    const words = this.message.split(" "), lines = []
    let line = ""
    for (const word of words) {
      const next = line ? `${line} ${word}` : word
      if (ctx.measureText(next).width > w - 24 && line) { lines.push(line); line = word } else line = next
    }
    if (line) lines.push(line)
    lines.forEach((l, i) => ctx.fillText(l, w / 2, h / 2 + (i - (lines.length - 1) / 2) * 16))
    ctx.restore()
  }

  /** Target positions of source points (pixel-centre coordinates) under the placement the view shows. */
  forward(points) {
    const P = this.patch, p = this.params()
    return P ? points.map((q) => M.forward(P.anchor, P.src, P.tgt, p, q)) : null
  }

  /** Client (page) coordinates of the view's landmarks: what the browser tests drag. */
  describe() {
    this.redraw()
    if (!this.patch || !this.layout) return { ready: false, message: this.message }
    const r = this.canvas.getBoundingClientRect(), sx = r.width / this.element.clientWidth
    const client = ([u, v]) => [r.left + u * sx, r.top + v * sx]
    const p = this.params(), H = this.handles(p), P = this.patch
    return {
      ready: true, params: p, clientPerTargetPx: this.layout.k * sx,
      anchor: client(H.anchor), corners: H.corners.map(client), rotate: client(H.rotate),
      source: P.src, target: P.tgt, sourceAnchor: P.anchor, bbox: P.bbox,
    }
  }
}

// ------------------------------------------------------------------ registration

app.registerExtension({
  name: "harmonizing_attention.placement",
  nodeCreated(node) {
    if (!NODES.has(typeOf(node)) || !node.addDOMWidget) return
    const view = new PlacementView(node)
    const widget = node.addDOMWidget("placement", "ha_placement", view.element, {
      serialize: false, hideOnZoom: false, getMinHeight: () => MIN_HEIGHT,
      getValue: () => "", setValue: () => {},
    })
    widget.serialize = false  // neither in widgets_values nor in the API prompt
    node.haPlacement = view
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
    const onExecuted = node.onExecuted
    node.onExecuted = function (output) {
      onExecuted?.apply(this, arguments)
      const items = output?.ha_placement
      if (Array.isArray(items)) {
        view.lastRun = Object.fromEntries(items.filter((i) => i?.role).map((i) =>
          [i.role, api.apiURL(`/view?${new URLSearchParams({ filename: i.filename, type: i.type, subfolder: i.subfolder ?? "" })}`)]))
        view.poll()
      }
    }
    const onRemoved = node.onRemoved
    node.onRemoved = function () {
      view.stop()
      return onRemoved?.apply(this, arguments)
    }
    const onAdded = node.onAdded
    node.onAdded = function () {
      view.start()
      return onAdded?.apply(this, arguments)
    }
    // room for the view, also when a saved workflow (configure) brings the node's old, smaller size
    const fit = () => {
      const [w, h] = node.size
      const min = node.computeSize?.() ?? [w, h]
      if (w < min[0] || h < min[1]) node.setSize?.([Math.max(w, min[0]), Math.max(h, min[1])])
    }
    const onConfigure = node.onConfigure
    node.onConfigure = function () {
      const out = onConfigure?.apply(this, arguments)
      fit()
      return out
    }
    fit()
    view.poll()
  },
})
