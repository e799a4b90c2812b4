// What the pack's frontend extensions (placement.js, notes.js) share to put their own DOM on a node: which node class
// a node is, an element built in one call, a node callback chained after the one already there, and a DOM widget that
// is never saved. Pure helpers, no extension of its own.

/** The node's class (its node ID, e.g. "HA_GeometryImageEdit") on both frontends. */
export const typeOf = (node) => node?.constructor?.comfyClass ?? node?.comfyClass ?? node?.type

/** A `tag` element with inline `style`, appended to `parent` when given, with `className` when given. */
export function el(tag, style, parent, className) {
  const e = document.createElement(tag)
  Object.assign(e.style, style)
  if (className) e.className = className
  parent?.appendChild(e)
  return e
}

/** Chain `fn` after the node's (or prototype's) own `name` callback: the original runs first and its result is
 *  returned, so other extensions' hooks keep working. */
export function chain(target, name, fn) {
  const original = target[name]
  target[name] = function (...args) {
    const out = original?.apply(this, args)
    fn.apply(this, args)
    return out
  }
}

/** A DOM widget `name` of type `type` showing `element` on the node, in neither widgets_values nor the API prompt.
 *  `options`: the frontends' DOM widget options (getMinHeight, getMaxHeight, hideOnZoom, margin). */
export function addViewWidget(node, name, type, element, options = {}) {
  const widget = node.addDOMWidget(name, type, element, {
    serialize: false, getValue: () => "", setValue: () => {}, ...options,
  })
  widget.serialize = false
  return widget
}
