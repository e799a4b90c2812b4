// The placement convention of HA_GeometryImageEdit, in JavaScript: the same numbers as attention/edit.py
// (whose module docstring is the one description of the convention; tests/test_placement_browser.py
// compares the two). Pure functions, no DOM: the view (placement.js) draws with them.
//
// Pixel-centre coordinates: the pixel at column j, row i has its centre at (x, y) = (j, i); its area is
// [j - 0.5, j + 0.5] x [i - 0.5, i + 0.5]. Masks are binarised at 0.5.
// T: the anchor a (centre of the source mask's bounding box) lands at the same relative position on the
// target (to the nearest whole pixel offset from a, so that source pixels land on target pixels), plus the
// shift; scale and rotation (degrees, counter-clockwise on screen, y pointing down) act about it:
// t = landing + scale * R (s - a), R = [[cos, sin], [-sin, cos]].

/** Binary mask (Uint8Array, 1 = region) from RGBA pixels, as ComfyUI's loaders read it.
 *  channel: "red" | "green" | "blue" | "alpha"; alpha gives 1 - a (LoadImage's MASK output and
 *  LoadImageMask's "alpha"), a colour channel gives its value. Binarised at 0.5 like the pack. */
export function maskFromRGBA(data, width, height, channel) {
  const offset = { red: 0, green: 1, blue: 2, alpha: 3 }[channel] ?? 3
  const out = new Uint8Array(width * height)
  for (let i = 0; i < out.length; i++) {
    const v = data[4 * i + offset] / 255
    out[i] = (offset === 3 ? 1 - v : v) >= 0.5 ? 1 : 0
  }
  return out
}

/** Bounding box {x0, y0, x1, y1} (inclusive pixel indices) of a binary mask, or null when it is empty. */
export function maskBBox(mask, width, height) {
  let x0 = width, y0 = height, x1 = -1, y1 = -1
  for (let y = 0; y < height; y++) {
    const row = y * width
    for (let x = 0; x < width; x++) {
      if (mask[row + x]) {
        if (x < x0) x0 = x
        if (x > x1) x1 = x
        if (y < y0) y0 = y
        y1 = y
      }
    }
  }
  return x1 < 0 ? null : { x0, y0, x1, y1 }
}

/** The anchor: the bounding box's centre in pixel-centre coordinates (edit.mask_anchor). */
export function anchorOf(bbox) {
  return [(bbox.x0 + bbox.x1) / 2, (bbox.y0 + bbox.y1) / 2]
}

/** Where the anchor lands on the target (edit._landing): same relative position, to the nearest whole pixel
 *  offset from the anchor (halves round up), then the shift. Source and target of one size: the anchor. */
export function landing(anchor, src, tgt, p) {
  const dx = Math.floor((anchor[0] + 0.5) * tgt.width / src.width - 0.5 - anchor[0] + 0.5)
  const dy = Math.floor((anchor[1] + 0.5) * tgt.height / src.height - 0.5 - anchor[1] + 0.5)
  return [anchor[0] + dx + p.shift_x, anchor[1] + dy + p.shift_y]
}

/** T: a source point (pixel-centre coordinates) to its target position (edit.forward). */
export function forward(anchor, src, tgt, p, point) {
  const [tx, ty] = landing(anchor, src, tgt, p)
  const th = p.rotation * Math.PI / 180, c = Math.cos(th), s = Math.sin(th)
  const dx = point[0] - anchor[0], dy = point[1] - anchor[1]
  return [tx + p.scale * (c * dx + s * dy), ty + p.scale * (-s * dx + c * dy)]
}

/** T^-1: a target point to the source point that lands there (what edit.place_source samples). */
export function inverse(anchor, src, tgt, p, point) {
  const [tx, ty] = landing(anchor, src, tgt, p)
  const th = p.rotation * Math.PI / 180, c = Math.cos(th), s = Math.sin(th)
  const dx = point[0] - tx, dy = point[1] - ty
  return [anchor[0] + (c * dx - s * dy) / p.scale, anchor[1] + (s * dx + c * dy) / p.scale]
}

/** The 2D affine [a, b, c, d, e, f] (canvas setTransform order: x' = a x + c y + e, y' = b x + d y + f)
 *  taking source *edge* coordinates (pixel j spans [j, j + 1], what drawImage uses) to target edge
 *  coordinates under T. */
export function edgeAffine(anchor, src, tgt, p) {
  const [tx, ty] = landing(anchor, src, tgt, p)
  const th = p.rotation * Math.PI / 180, c = Math.cos(th), s = Math.sin(th)
  const a = p.scale * c, b = -p.scale * s, cc = p.scale * s, d = p.scale * c
  const ax = anchor[0] + 0.5, ay = anchor[1] + 0.5
  return [a, b, cc, d, tx + 0.5 - (a * ax + cc * ay), ty + 0.5 - (b * ax + d * ay)]
}

/** The region's outline as line segments [x0, y0, x1, y1] in source edge coordinates: every pixel edge
 *  between a region pixel and a non-region one (or the border), merged along rows and columns. */
export function maskOutline(mask, width, height) {
  const at = (x, y) => (x >= 0 && y >= 0 && x < width && y < height ? mask[y * width + x] : 0)
  const segments = []
  for (let y = 0; y <= height; y++) {  // horizontal edges at y, between rows y - 1 and y
    let start = -1
    for (let x = 0; x <= width; x++) {
      const edge = x < width && at(x, y - 1) !== at(x, y)
      if (edge && start < 0) start = x
      if (!edge && start >= 0) { segments.push([start, y, x, y]); start = -1 }
    }
  }
  for (let x = 0; x <= width; x++) {  // vertical edges at x, between columns x - 1 and x
    let start = -1
    for (let y = 0; y <= height; y++) {
      const edge = y < height && at(x - 1, y) !== at(x, y)
      if (edge && start < 0) start = y
      if (!edge && start >= 0) { segments.push([x, start, x, y]); start = -1 }
    }
  }
  return segments
}

/** A widget value as a gesture writes it: whole target pixels, scale to 0.001 within the widget's range,
 *  rotation to 0.1 degree wrapped into (-180, 180]. */
export function tidy(name, value) {
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v))
  if (name === "scale") return clamp(Math.round(value * 1000) / 1000, 0.05, 8)
  if (name === "rotation") {
    const r = Math.round((((value + 180) % 360 + 360) % 360 - 180) * 10) / 10
    return r === -180 ? 180 : r
  }
  return clamp(Math.round(value), -16384, 16384)
}

// The working region (attention/window.py's layout, number for number; tests/test_working_region.py compares them).
export const WORKING_REGION = { context: 0.5, minMargin: 64, maxUpscale: 2, canvasMultiple: 16 }

/** Where the model runs (HA_GeometryImageEdit's working_size and context): the window on the target, the origin of the
 *  same-sized window on each source, the canvas both are resampled to. geoBox: maskBBox of M_geo (all geometries'
 *  union) on the target; sourceBoxes: maskBBox of each source mask (inclusive pixel indices, as maskBBox gives).
 *  Returns {box: [x0, y0, x1, y1] (half-open, target px; it may reach past the target), sourceOrigins: [[x0, y0]...],
 *  canvas: {width, height}, upscaleLimited}. workingSize 0: the whole target at its own pixels. */
export function workingWindow(geoBox, sourceBoxes, tgt, src, workingSize, context = WORKING_REGION.context) {
  const R = WORKING_REGION
  const open = (b) => [b.x0, b.y0, b.x1 + 1, b.y1 + 1]
  const geo = open(geoBox), boxes = sourceBoxes.map(open)
  const sw = Math.max(...boxes.map((b) => b[2] - b[0])), sh = Math.max(...boxes.map((b) => b[3] - b[1]))
  const place = (centre, size, length) =>
    Math.min(Math.max(0, length - size), Math.max(Math.min(0, length - size), Math.floor(centre - size / 2 + 0.5)))
  const multiple = (v) => Math.max(R.canvasMultiple, Math.floor(v / R.canvasMultiple + 0.5) * R.canvasMultiple)
  let bw, bh, canvas, limited = false
  if (workingSize <= 0) {
    bw = tgt.width; bh = tgt.height; canvas = { width: bw, height: bh }
  } else {
    const needW = Math.max(geo[2] - geo[0], sw), needH = Math.max(geo[3] - geo[1], sh)
    const margin = Math.max(R.minMargin, context * Math.max(needW, needH))
    let fw = needW + 2 * margin, fh = needH + 2 * margin
    const half = workingSize / R.maxUpscale, least = half * half
    if (fw * fh < least) {
      const k = Math.sqrt(least / (fw * fh))
      fw = fw * k; fh = fh * k
    }
    const limW = Math.max(tgt.width, sw), limH = Math.max(tgt.height, sh)
    bw = Math.min(limW, Math.ceil(fw)); bh = Math.min(limH, Math.ceil(fh))
    if (bw * bh < least) {
      if (bw === limW) bh = Math.min(limH, Math.ceil(least / bw))
      else bw = Math.min(limW, Math.ceil(least / bh))
    }
    let f = workingSize / Math.sqrt(bw * bh)
    limited = f > R.maxUpscale
    f = Math.min(R.maxUpscale, f)
    canvas = { width: multiple(bw * f), height: multiple(bh * f) }
  }
  const x0 = place((geo[0] + geo[2]) / 2, bw, tgt.width), y0 = place((geo[1] + geo[3]) / 2, bh, tgt.height)
  const sourceOrigins = boxes.map((b) => [place((b[0] + b[2]) / 2, bw, src.width), place((b[1] + b[3]) / 2, bh, src.height)])
  return { box: [x0, y0, x0 + bw, y0 + bh], sourceOrigins, canvas, upscaleLimited: limited }
}
