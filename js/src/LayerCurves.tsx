import { type CSSProperties, type ReactElement } from "react";
import { CURVE_COLOURS } from "./colors";
import { formatSig } from "./format";
import { useHoverLock } from "./useHoverLock";

/** One named curve over the stack labels, with an optional null baseline. */
export interface LayerCurveSeries {
  name: string;
  /** One value per label; null leaves a gap. Length L. */
  values: (number | null)[];
  /** What the curve would be by chance: drawn as a dashed line at `mean` in a band of ± `std`. */
  baseline?: { mean: (number | null)[]; std: (number | null)[] };
}

export interface LayerCurvesProps {
  /** Title over the figure. */
  title?: string;
  /** The L stack labels along the x axis. */
  labels: string[];
  /** The curves, drawn in this order and these colours (Okabe-Ito). */
  series: LayerCurveSeries[];
  /** The y axis's label. */
  ylabel?: string;
  /** The y range; what lies beyond it is clipped. */
  ymin: number;
  ymax: number;
  /** The y ticks, and the decimals to print them with. */
  yTicks: number[];
  yDecimals: number;
}

const FONT = 10;
const CHAR = 6.2; // mean width of a label character at 10 px, to size the margins
const PAD = 10; // keeps the end points off the frame

function segments(values: (number | null)[]): [number, number][][] {
  const out: [number, number][][] = [[]];
  values.forEach((v, i) => {
    if (v === null || !Number.isFinite(v)) out.push([]);
    else out[out.length - 1].push([i, v]);
  });
  return out.filter((s) => s.length > 0);
}

/**
 * Layer curves
 *
 * Per-entry curves (principal angles, variance in a subspace, KL to final, ...) over the stack
 * labels, each with its null baseline as a dashed line in a band of one standard deviation, a
 * legend and a y label. Hovering over the plot picks the nearest entry and shows every curve's
 * value there (and its baseline); clicking keeps it shown.
 */
export function LayerCurves({ title, labels, series, ylabel, ymin, ymax, yTicks, yDecimals }: LayerCurvesProps) {
  const { focused, onClick, onMouseEnter, onMouseLeave } = useHoverLock();
  const L = labels.length;
  const plotW = Math.max(360, Math.min(720, 22 * L));
  const plotH = 260;
  const left = ylabel ? 70 : 56;
  const top = 8;
  const longest = Math.max(1, ...labels.map((s) => s.length));
  const bottom = 14 + CHAR * longest * 0.77 + 8;
  const legendNames = series.flatMap((s) => (s.baseline ? [s.name, `${s.name} (null ± 1 sd)`] : [s.name]));
  const legendW = 28 + 6.5 * Math.max(...legendNames.map((n) => n.length));
  const lx = left + plotW + 16;
  const width = lx + legendW;
  const height = top + Math.max(plotH + bottom, 16 * legendNames.length + 12);
  const X = (i: number) => left + PAD + (L > 1 ? ((plotW - 2 * PAD) * i) / (L - 1) : (plotW - 2 * PAD) / 2);
  const Y = (v: number) => top + plotH * (1 - (v - ymin) / (ymax - ymin));
  const spacing = L > 1 ? (plotW - 2 * PAD) / (L - 1) : plotW;
  const step = Math.max(1, Math.ceil((FONT + 2) / spacing));
  const line = (pts: [number, number][]) =>
    pts.map(([i, v], k) => `${k === 0 ? "M" : "L"}${X(i).toFixed(2)},${Y(v).toFixed(2)}`).join("");
  const colour = (n: number) => CURVE_COLOURS[n % CURVE_COLOURS.length];

  let details = <span style={{ color: "#666" }}>Hover over the plot for the values at an entry; click to keep them.</span>;
  if (focused !== null && focused < L) {
    const i = focused;
    details = (
      <span>
        <b data-testid="curves-details-label">{labels[i]}</b>
        {series.map((s, n) => {
          const mean = s.baseline ? s.baseline.mean[i] : null;
          const std = s.baseline ? s.baseline.std[i] : null;
          return (
            <span key={s.name} data-testid="curves-details-item" data-name={s.name} style={{ marginLeft: 12 }}>
              <span style={{ ...styles.swatch, backgroundColor: colour(n) }} /> {s.name}:{" "}
              <b data-testid="curves-details-value">{formatSig(s.values[i])}</b>
              {s.baseline ? (
                <span data-testid="curves-details-null" style={{ color: "#555" }}>
                  {" "}
                  (null {formatSig(mean)} ± {formatSig(std ?? 0, 3)})
                </span>
              ) : null}
            </span>
          );
        })}
      </span>
    );
  }

  const bands: ReactElement[] = [];
  const curves: ReactElement[] = [];
  series.forEach((s, n) => {
    if (s.baseline) {
      const { mean, std } = s.baseline;
      const bandPaths = segments(mean).map((seg) => {
        const upper = seg.map(([i, m]) => [i, m + (std[i] ?? 0)] as [number, number]);
        const lower = seg.map(([i, m]) => [i, m - (std[i] ?? 0)] as [number, number]).reverse();
        return `${line(upper)}${line(lower).replace(/^M/, "L")}Z`;
      });
      bands.push(
        <path key={`band-${n}`} data-testid="null-band" data-name={s.name} d={bandPaths.join("")} fill={colour(n)}
          fillOpacity={0.15} stroke="none" />,
        <path key={`mean-${n}`} data-testid="null-mean" data-name={s.name} d={segments(mean).map(line).join("")}
          fill="none" stroke={colour(n)} strokeWidth={1.2} strokeDasharray="5 3" />
      );
    }
    curves.push(
      <g key={`curve-${n}`}>
        <path data-testid="curve-path" data-name={s.name} d={segments(s.values).map(line).join("")} fill="none"
          stroke={colour(n)} strokeWidth={2} />
        {s.values.map((v, i) =>
          v === null || !Number.isFinite(v) ? null : (
            <circle key={i} data-testid="curve-point" data-name={s.name} data-index={i} data-value={v} cx={X(i)}
              cy={Y(v)} r={focused === i ? 4 : 2.5} fill={colour(n)} />
          )
        )}
      </g>
    );
  });

  const legend: ReactElement[] = [];
  let ly = top + 6;
  series.forEach((s, n) => {
    legend.push(
      <g key={`l-${n}`} data-testid="curves-legend-item" data-name={s.name}>
        <line x1={lx} x2={lx + 18} y1={ly} y2={ly} stroke={colour(n)} strokeWidth={2} />
        <text x={lx + 24} y={ly} dominantBaseline="middle">
          {s.name}
        </text>
      </g>
    );
    ly += 16;
    if (s.baseline) {
      legend.push(
        <g key={`ln-${n}`} data-testid="curves-legend-null" data-name={s.name}>
          <rect x={lx} y={ly - 5} width={18} height={10} fill={colour(n)} fillOpacity={0.15} />
          <line x1={lx} x2={lx + 18} y1={ly} y2={ly} stroke={colour(n)} strokeWidth={1.2} strokeDasharray="5 3" />
          <text x={lx + 24} y={ly} dominantBaseline="middle">
            {`${s.name} (null ± 1 sd)`}
          </text>
        </g>
      );
      ly += 16;
    }
  });

  return (
    <div data-testid="curves-root" style={styles.root}>
      {title ? (
        <div data-testid="curves-title" style={styles.title}>
          {title}
        </div>
      ) : null}
      <div data-testid="curves-details" style={styles.details}>
        {details}
      </div>
      <svg width={width} height={height} viewBox={`0 0 ${width} ${height}`} fontSize={FONT} role="img"
        aria-label={title || ylabel || "layer curves"} style={{ display: "block" }}>
        {yTicks.map((v) => (
          <g key={v}>
            <line x1={left} x2={left + plotW} y1={Y(v)} y2={Y(v)} stroke="#e6e6e6" />
            <text data-testid="curves-y-tick" x={left - 6} y={Y(v)} textAnchor="end" dominantBaseline="middle">
              {v.toFixed(yDecimals)}
            </text>
          </g>
        ))}
        {labels.map((label, i) => {
          if (i % step !== 0 && i !== focused) return null;
          const x = X(i);
          const y0 = top + plotH + 8;
          return (
            <g key={label + i}>
              <line x1={x} x2={x} y1={top + plotH} y2={top + plotH + 4} stroke="#666" />
              <text data-testid="curves-x-tick" x={x} y={y0} textAnchor="end" dominantBaseline="middle"
                fontWeight={i === focused ? "bold" : "normal"} transform={`rotate(-50 ${x} ${y0})`}>
                {label}
              </text>
            </g>
          );
        })}
        {ylabel ? (
          <text data-testid="curves-ylabel" x={16} y={top + plotH / 2} textAnchor="middle" fontSize={11}
            transform={`rotate(-90 16 ${top + plotH / 2})`}>
            {ylabel}
          </text>
        ) : null}
        {/* A nested svg clips what lies beyond the y range to the plot, without ids. */}
        <svg x={left} y={top} width={plotW} height={plotH} viewBox={`${left} ${top} ${plotW} ${plotH}`} overflow="hidden">
          {bands}
          {focused !== null && focused < L ? (
            <line data-testid="curves-cursor" x1={X(focused)} x2={X(focused)} y1={top} y2={top + plotH} stroke="#999"
              strokeDasharray="2 2" />
          ) : null}
          {curves}
          {labels.map((_label, i) => (
            <rect key={i} data-testid="curves-column" data-index={i} x={X(i) - spacing / 2} y={top} width={spacing}
              height={plotH} fill="transparent" onMouseEnter={() => onMouseEnter(i)} onMouseLeave={onMouseLeave}
              onClick={() => onClick(i)} />
          ))}
        </svg>
        <rect x={left} y={top} width={plotW} height={plotH} fill="none" stroke="#666" />
        {legend}
      </svg>
    </div>
  );
}

const styles: Record<string, CSSProperties> = {
  root: {
    fontFamily: "-apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Arial, sans-serif",
    fontSize: 13,
    color: "black",
    backgroundColor: "white",
    padding: 6,
    display: "inline-block"
  },
  title: { fontWeight: "bold", fontSize: 15, marginBottom: 4 },
  details: { minHeight: 18, marginBottom: 4, fontSize: 12 },
  swatch: { display: "inline-block", width: 12, height: 3, verticalAlign: "middle" }
};
