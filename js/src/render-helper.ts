import { createElement, type ComponentType } from "react";
import { createRoot } from "react-dom/client";

/**
 * Render a component into the element with id `divID`: the same helper CircuitsVis exposes
 * as `CircuitsVis.render`, so a page calls `TLLatentSpaces.render(id, TLLatentSpaces.LensGrid,
 * props)` exactly as it calls a CircuitsVis component.
 *
 * @param divID ID of the element to render into
 * @param component A component of this bundle (e.g. `TLLatentSpaces.LensGrid`)
 * @param props Its props, as an object
 */
export function render(
  divID: string,
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  component: ComponentType<any>,
  props: Record<string, unknown> = {}
): void {
  const div = document.getElementById(divID);
  if (!div) {
    throw new Error(`TLLatentSpaces.render: no element with id "${divID}"`);
  }
  createRoot(div).render(createElement(component, props));
}
