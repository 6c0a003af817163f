import { type CSSProperties } from "react";
import { MISSING, viridis } from "./colors";
import { formatSig } from "./format";
import { useHoverLock } from "./useHoverLock";

export interface MatrixHeatmapProps {
  /** Title over the figure. */
  title?: string;
  /** The values, shape [L][L]: row i, column j is drawn at row i from the top; null for none. */
  matrix: (number | null)[][];
  /** The L labels of the rows, which are also those of the columns (e.g. `"0_pre"` ... `"final_post"`). */
  labels: string[];
  /** The value at the bottom of the colour scale (darkest). */
  vmin: number;
  /** The value at the top of the colour scale (lightest); greater than `vmin`. */
  vmax: number;
}

const FONT = 10;
const CHAR = 6.2; // mean width of a label character at 10 px, to size the margins
const BAR_STEPS = 40;

/** Show every k-th label, so that labels `size` px apart do not overlap. */
function labelStep(size: number): number {
  return Math.max(1, Math.ceil((FONT + 2) / Math.max(size, 1e-9)));
}

/**
 * Matrix heat map
 *
 * A square matrix between stack entries (linear CKA, say) in viridis: labelled rows and columns,
 * a colour bar with its bounds, cells without a value in grey. Hovering a cell shows its row,
 * column and value (and highlights both labels); clicking keeps it shown.
 */
export function MatrixHeatmap({ title, matrix, labels, vmin, vmax }: MatrixHeatmapProps) {
  const { focused, onClick, onMouseEnter, onMouseLeave } = useHoverLock();
  const L = labels.length;
  const cell = Math.min(28, Math.max(6, 520 / Math.max(L, 1)));
  const longest = Math.max(1, ...labels.map((s) => s.length));
  const left = 8 + CHAR * longest;
  const top = 8;
  const size = cell * L;
  const below = 10 + CHAR * longest * 0.77; // column labels turned by 50 degrees
  const barX = left + size + 18;
  const barH = Math.max(size, 60);
  const width = barX + 12 + 6 + 56;
  const height = top + Math.max(size + below, barH + 24);
  const step = labelStep(cell);
  const t = (v: number) => (v - vmin) / (vmax - vmin);
  const finite = matrix.flat().filter((v): v is number => v !== null && Number.isFinite(v));
  const clipLow = finite.some((v) => v < vmin);
  const clipHigh = finite.some((v) => v > vmax);
  const anyMissing = finite.length < L * L;

  const fi = focused === null ? -1 : Math.floor(focused / L);
  const fj = focused === null ? -1 : focused % L;
  let details = <span style={{ color: "#666" }}>Hover over a cell for its value; click to keep it.</span>;
  if (focused !== null && fi < L) {
    const v = matrix[fi][fj];
    details = (
      <span>
        <b data-testid="matrix-details-row">{labels[fi]}</b> × <b data-testid="matrix-details-col">{labels[fj]}</b>:{" "}
        <span data-testid="matrix-details-value">{formatSig(v)}</span>
        {fi === fj ? <span style={{ color: "#666" }}> (an entry with itself)</span> : null}
      </span>
    );
  }

  const cells = [];
  for (let i = 0; i < L; i++) {
    for (let j = 0; j < L; j++) {
      const v = matrix[i][j];
      const index = i * L + j;
      cells.push(
        <rect
          key={index}
          data-testid="matrix-cell"
          data-row={i}
          data-col={j}
          data-value={v ?? ""}
          data-diagonal={i === j}
          x={left + j * cell}
          y={top + i * cell}
          width={cell}
          height={cell}
          fill={v === null || !Number.isFinite(v) ? MISSING : viridis(t(v))}
          onMouseEnter={() => onMouseEnter(index)}
          onMouseLeave={onMouseLeave}
          onClick={() => onClick(index)}
          style={{ cursor: "pointer" }}
        />
      );
    }
  }
  const rowLabels = [];
  const colLabels = [];
  for (let i = 0; i < L; i++) {
    const shown = i % step === 0 || i === fi || i === fj;
    if (!shown) continue;
    const rowBold = i === fi ? "bold" : "normal";
    const colBold = i === fj ? "bold" : "normal";
    const y = top + (i + 0.5) * cell;
    const x = left + (i + 0.5) * cell;
    const y0 = top + size + 6;
    rowLabels.push(
      <text key={i} data-testid="matrix-row-label" x={left - 4} y={y} textAnchor="end" dominantBaseline="middle"
        fontWeight={rowBold}>
        {labels[i]}
      </text>
    );
    colLabels.push(
      <text key={i} data-testid="matrix-col-label" x={x} y={y0} textAnchor="end" dominantBaseline="middle"
        fontWeight={colBold} transform={`rotate(-50 ${x} ${y0})`}>
        {labels[i]}
      </text>
    );
  }
  const bar = [];
  for (let k = 0; k < BAR_STEPS; k++) {
    bar.push(
      <rect key={k} x={barX} y={top + (k * barH) / BAR_STEPS} width={12} height={barH / BAR_STEPS + 0.5}
        fill={viridis(1 - (k + 0.5) / BAR_STEPS)} />
    );
  }
  const focusBox =
    focused !== null && fi < L ? (
      <rect x={left + fj * cell} y={top + fi * cell} width={cell} height={cell} fill="none" stroke="black"
        strokeWidth={2} pointerEvents="none" />
    ) : null;

  return (
    <div data-testid="matrix-root" style={styles.root}>
      {title ? (
        <div data-testid="matrix-title" style={styles.title}>
          {title}
        </div>
      ) : null}
      <div data-testid="matrix-details" style={styles.details}>
        {details}
      </div>
      <svg width={width} height={height} viewBox={`0 0 ${width} ${height}`} fontSize={FONT} role="img"
        aria-label={title || "matrix"} style={{ display: "block" }}>
        {cells}
        {focusBox}
        {rowLabels}
        {colLabels}
        <g data-testid="matrix-bar">
          {bar}
          <rect x={barX} y={top} width={12} height={barH} fill="none" stroke="#999" />
          <text data-testid="matrix-bar-max" x={barX + 16} y={top + 4} dominantBaseline="middle">
            {(clipHigh ? "≥ " : "") + formatSig(vmax, 3)}
          </text>
          <text data-testid="matrix-bar-mid" x={barX + 16} y={top + barH / 2} dominantBaseline="middle">
            {formatSig((vmin + vmax) / 2, 3)}
          </text>
          <text data-testid="matrix-bar-min" x={barX + 16} y={top + barH - 4} dominantBaseline="middle">
            {(clipLow ? "≤ " : "") + formatSig(vmin, 3)}
          </text>
        </g>
        {anyMissing ? (
          <g data-testid="matrix-missing-key">
            <rect x={barX} y={top + barH + 6} width={12} height={10} fill={MISSING} stroke="#999" />
            <text x={barX + 16} y={top + barH + 11} dominantBaseline="middle">
              no value
            </text>
          </g>
        ) : null}
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
  details: { minHeight: 18, marginBottom: 4, fontSize: 12 }
};
