/**
 * tl_latentspaces views: React components rendered from Python, CircuitsVis style.
 *
 * The bundle defines the global `TLLatentSpaces`; Python renders a component with
 * `TLLatentSpaces.render("div-id", TLLatentSpaces.LensGrid, props)`.
 */
export { render } from "./render-helper";
export { LensGrid } from "./LensGrid";
export { TokenDrift } from "./TokenDrift";
export { MatrixHeatmap } from "./MatrixHeatmap";
export { LayerCurves } from "./LayerCurves";
export type { LensGridProps, LensGridLens, LensGridMetric } from "./LensGrid";
export type { TokenDriftProps, TokenDriftMetric } from "./TokenDrift";
export type { MatrixHeatmapProps } from "./MatrixHeatmap";
export type { LayerCurvesProps, LayerCurveSeries } from "./LayerCurves";
