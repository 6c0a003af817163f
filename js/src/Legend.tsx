import { legendGradient, type ScaleSpec } from "./colors";
import { formatValue, type ValueFormat } from "./format";

/** What the legend states about a metric's colours. */
export interface LegendMetric extends ScaleSpec, ValueFormat {
  name: string;
  description: string;
  /** How the range was chosen, e.g. "log scale, 2nd to 98th percentile of this lens". */
  rangeNote?: string;
  /** Some values lie below `min` / above `max` and take the end colour. */
  clipLow?: boolean;
  clipHigh?: boolean;
}

/**
 * The colour bar of a metric: its name, range (with ≤ / ≥ where values beyond it are
 * clipped), how the range was chosen, and what the colour means.
 */
export function Legend({ metric }: { metric: LegendMetric }) {
  return (
    <div
      data-testid="legend"
      style={{ display: "flex", alignItems: "center", flexWrap: "wrap", gap: 6, margin: "6px 0" }}
    >
      <b data-testid="legend-name">{metric.name}</b>
      {metric.clipLow ? <span data-testid="legend-clip-low">≤</span> : null}
      <span data-testid="legend-min">{formatValue(metric.min, metric)}</span>
      <span
        style={{
          display: "inline-block",
          width: 160,
          height: 12,
          border: "1px solid #999",
          background: legendGradient(metric)
        }}
      />
      {metric.clipHigh ? <span data-testid="legend-clip-high">≥</span> : null}
      <span data-testid="legend-max">{formatValue(metric.max, metric)}</span>
      {metric.rangeNote ? (
        <span data-testid="legend-range" style={{ color: "#555" }}>
          ({metric.rangeNote})
        </span>
      ) : null}
      <span data-testid="legend-description" style={{ color: "#555" }}>
        · {metric.description}
      </span>
    </div>
  );
}
