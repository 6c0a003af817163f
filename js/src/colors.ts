/**
 * Colour scales of the lens grid.
 *
 * Sequential metrics mix white into one colour (CircuitsVis's convention: `colord(color).mix(
 * "white", 1 - t)`); diverging metrics use red below zero and blue above, white at zero.
 */

export type RGB = [number, number, number];

/** Colour-blind friendly blue and red (the pair CircuitsVis's colour helpers default to). */
export const POSITIVE: RGB = [30, 136, 229]; // #1E88E5
export const NEGATIVE: RGB = [216, 27, 96]; // #D81B60
const WHITE: RGB = [255, 255, 255];
/** Cells without a value (never drawn for real positions, but props may hold null). */
export const MISSING = "rgb(229, 229, 229)";

/** What a colour scale needs to know about a metric. */
export interface ScaleSpec {
  min: number;
  max: number;
  scale: "sequential" | "diverging";
  /** The colour is strongest at the low end (entropy, KL, rank: low means close to the answer). */
  reverse: boolean;
  /** Compress with log(1 + |x|) first (ranks). */
  log: boolean;
}

function clamp(x: number, lo: number, hi: number): number {
  return Math.min(Math.max(x, lo), hi);
}

function squash(x: number, log: boolean): number {
  return log ? Math.sign(x) * Math.log1p(Math.abs(x)) : x;
}

/**
 * Signed intensity of a value: in [0, 1] for sequential scales, [-1, 1] for diverging ones.
 * NaN for a missing value.
 */
export function intensity(value: number | null, spec: ScaleSpec): number {
  if (value === null || !Number.isFinite(value)) return NaN;
  if (spec.scale === "diverging") {
    const bound = Math.max(Math.abs(squash(spec.min, spec.log)), Math.abs(squash(spec.max, spec.log)));
    const t = bound > 0 ? clamp(squash(value, spec.log) / bound, -1, 1) : 0;
    return spec.reverse ? -t : t;
  }
  const lo = squash(spec.min, spec.log);
  const hi = squash(spec.max, spec.log);
  const t = hi > lo ? clamp((squash(value, spec.log) - lo) / (hi - lo), 0, 1) : 0;
  return spec.reverse ? 1 - t : t;
}

function mix(color: RGB, t: number): string {
  const c = color.map((ch, i) => Math.round(WHITE[i] + (ch - WHITE[i]) * t));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

/** Background colour of a signed intensity (see {@link intensity}). */
export function colorOf(t: number): string {
  if (Number.isNaN(t)) return MISSING;
  return t < 0 ? mix(NEGATIVE, -t) : mix(POSITIVE, t);
}

/** Black text on light cells, white on dark ones. */
export function textColorOf(t: number): string {
  return Math.abs(t) > 0.6 ? "white" : "black";
}

/** A CSS gradient running from the metric's min to its max, for the legend. */
export function legendGradient(spec: ScaleSpec, steps = 11): string {
  const stops: string[] = [];
  for (let i = 0; i < steps; i++) {
    const f = i / (steps - 1);
    let v: number;
    if (spec.log) {
      // Sample evenly in the squashed space so the bar shows what the cells show.
      const lo = squash(spec.min, true);
      const hi = squash(spec.max, true);
      const s = lo + f * (hi - lo);
      v = Math.sign(s) * Math.expm1(Math.abs(s));
    } else {
      v = spec.min + f * (spec.max - spec.min);
    }
    stops.push(`${colorOf(intensity(v, spec))} ${(f * 100).toFixed(0)}%`);
  }
  return `linear-gradient(to right, ${stops.join(", ")})`;
}

/** Viridis at 11 evenly spaced stops: perceptually uniform, lighter as it rises, readable in grey. */
const VIRIDIS = [
  "#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c",
  "#22a884", "#44bf70", "#7ad151", "#bddf26", "#fde725"
].map((hex) => [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16)) as RGB);

/** The viridis colour at `t` in [0, 1] (clamped), linear between the stops. */
export function viridis(t: number): string {
  const x = clamp(t, 0, 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const f = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * f));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

/** Okabe-Ito: curve colours told apart with every common colour-vision deficiency. */
export const CURVE_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];
