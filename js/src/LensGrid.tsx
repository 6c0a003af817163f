import { useState, type CSSProperties, type ReactNode } from "react";
import { colorOf, intensity, textColorOf } from "./colors";
import { displayToken, formatProb, formatValue } from "./format";
import { Legend } from "./Legend";
import { useHoverLock } from "./useHoverLock";

export { displayToken, formatValue } from "./format";

/** One way of colouring the grid. */
export interface LensGridMetric {
  /** Stable key, named after the result's field (e.g. `"top1_prob"`, `"kl_to_final"`, `"kl_delta"`). */
  key: string;
  /** Label on the metric button. */
  name: string;
  /** The view that shows it: a run index, or -1 for the difference view. */
  view: number;
  /** Values, shape [entry][pos]; null where there is none. */
  values: (number | null)[][];
  /** Colour range (values beyond it take the end colours). */
  min: number;
  max: number;
  /** How the range was chosen, stated in the legend. */
  rangeNote?: string;
  /** Whether some values lie below `min` / above `max`. */
  clipLow?: boolean;
  clipHigh?: boolean;
  /** White to blue (`"sequential"`), or red-white-blue around zero (`"diverging"`). */
  scale: "sequential" | "diverging";
  /** The colour is strongest at the low end (entropy, KL, ranks: low means close to the answer). */
  reverse: boolean;
  /** Compress with log(1 + |x|) before colouring (ranks). */
  log: boolean;
  /** How a value is printed. */
  format: "percent" | "number" | "integer" | "bool";
  /** Unit printed after a number, e.g. `"nats"`. */
  unit?: string;
  /** One sentence saying what the colour shows (under the legend). */
  description: string;
}

/** One lens read on the input: one run, or two runs (base and other) in difference mode. */
export interface LensGridLens {
  /** Name on the lens button, e.g. `"logit"`, `"tuned"`, `"embedding"`. */
  name: string;
  /** What `topScores` holds: `"logit"` or `"cosine"`. */
  scoreName: string;
  /** Top-k tokens, shape [run][entry][pos][k]. */
  topTokens: string[][][][];
  /** Their token ids, shape [run][entry][pos][k]. */
  topIds?: number[][][][];
  /** Their probabilities under the lens, shape [run][entry][pos][k]. */
  topProbs: number[][][][];
  /** Their raw scores, shape [run][entry][pos][k]. */
  topScores: number[][][][];
  /** The colourings this lens offers, for every view. */
  metrics: LensGridMetric[];
}

/**
 * Lens grid
 *
 * Rows are the residual-stack entries (`0_pre` ... `final_post`), columns the positions of the
 * input with their tokens as headers; each cell shows the lens's top-1 token, coloured by the
 * selected metric. Hover a cell to see its top-k tokens with their probabilities; click to keep
 * them shown. Switch lenses and metrics with the buttons. With two runs (difference mode) a view
 * switch shows either run or their difference: the other run's top-1 token, the base run's
 * struck through below it where it changed, coloured by a change in a metric.
 */
export function LensGrid({
  labels,
  tokens,
  tokenIds,
  tokenNotes,
  positions,
  bos = false,
  hideBos: initialHideBos = false,
  compact: initialCompact = false,
  lenses,
  runs,
  title,
  initialLens = 0,
  initialMetric,
  initialView
}: LensGridProps) {
  const diffMode = !!runs && runs.length === 2;
  const [lensIndex, setLensIndex] = useState<number>(
    Math.min(Math.max(initialLens, 0), lenses.length - 1)
  );
  const [view, setView] = useState<number>(initialView ?? (diffMode ? -1 : 0));
  const [metricKey, setMetricKey] = useState<string | undefined>(initialMetric);
  const [hideBos, setHideBos] = useState<boolean>(bos && initialHideBos);
  const [compact, setCompact] = useState<boolean>(initialCompact);
  const [zoom, setZoom] = useState<number>(1);
  const { focused, onClick, onMouseEnter, onMouseLeave } = useHoverLock();

  const lens = lenses[lensIndex];
  const viewMetrics = lens.metrics.filter((m) => m.view === view);
  const metric = viewMetrics.find((m) => m.key === metricKey) ?? viewMetrics[0];
  const nPos = tokens.length;
  // The columns drawn: every position, less the BOS column while it is hidden.
  const columns = tokens.map((_t, p) => p).filter((p) => !(bos && hideBos && p === 0));
  const width = Math.round((compact ? COMPACT_WIDTH : CELL_WIDTH) * zoom);
  const fontSize = Math.max(7, Math.round((compact ? 10 : 12) * zoom));
  const sized: CSSProperties = { width, minWidth: width, maxWidth: width };
  const tokenTitle = (p: number) =>
    [tokenIds ? `id ${tokenIds[p]}` : "", tokenNotes && tokenNotes[p] ? tokenNotes[p] : ""]
      .filter((x) => x)
      .join(" · ");

  // The run whose tokens the cells show: the other run in the difference view.
  const shownRun = view < 0 ? 1 : view;

  const cell = (e: number, p: number) => {
    const index = e * nPos + p;
    const value = metric ? metric.values[e][p] : null;
    const t = metric ? intensity(value, metric) : NaN;
    const top1 = lens.topTokens[shownRun][e][p][0];
    const base1 = view < 0 ? lens.topTokens[0][e][p][0] : top1;
    const changed = view < 0 && base1 !== top1;
    const isFocused = focused === index;
    const ids = lens.topIds ? lens.topIds[shownRun][e][p] : undefined;
    return (
      <td
        key={p}
        data-testid="cell"
        data-entry={e}
        data-pos={p}
        data-changed={changed ? "true" : undefined}
        title={ids ? `${labels[e]} · ${displayToken(top1)} (id ${ids[0]})` : undefined}
        onMouseEnter={() => onMouseEnter(index)}
        onMouseLeave={onMouseLeave}
        onClick={() => onClick(index)}
        style={{
          ...styles.cell,
          ...sized,
          padding: compact ? "0 2px" : styles.cell.padding,
          backgroundColor: metric ? colorOf(t) : "white",
          color: textColorOf(t),
          outline: isFocused ? "2px solid black" : changed ? "1px dashed black" : "none",
          outlineOffset: -2
        }}
      >
        <span data-testid="cell-token" style={styles.cellText}>
          {displayToken(top1)}
        </span>
        {changed ? (
          <span data-testid="cell-base-token" style={styles.cellBase}>
            {displayToken(base1)}
          </span>
        ) : null}
      </td>
    );
  };

  let details: ReactNode = (
    <div style={{ color: "#666" }}>Hover over a cell to see its top-k tokens; click to keep them.</div>
  );
  if (focused !== null && focused !== undefined && focused < labels.length * nPos) {
    const e = Math.floor(focused / nPos);
    const p = focused % nPos;
    const shownRuns = view < 0 ? [0, 1] : [view];
    details = (
      <>
        <div style={{ fontWeight: "bold", marginBottom: 4 }}>
          {labels[e]} · position {positions[p]}{" "}
          <span style={styles.token}>{displayToken(tokens[p])}</span>
          {tokenIds ? (
            <span data-testid="details-token-id" style={{ fontWeight: "normal", color: "#555" }}>
              {" "}
              id {tokenIds[p]}
            </span>
          ) : null}
        </div>
        {tokenNotes && tokenNotes[p] ? (
          <div style={{ color: "#555", marginBottom: 4 }}>{tokenNotes[p]}</div>
        ) : null}
        {metric ? (
          <div data-testid="details-metric" style={{ marginBottom: 6 }}>
            {metric.name}: <b>{formatValue(metric.values[e][p], metric)}</b>
          </div>
        ) : null}
        {shownRuns.map((run) => (
          <TopK
            key={run}
            title={diffMode ? runs![run] : undefined}
            run={run}
            tokens={lens.topTokens[run][e][p]}
            ids={lens.topIds ? lens.topIds[run][e][p] : undefined}
            probs={lens.topProbs[run][e][p]}
            scores={lens.topScores[run][e][p]}
            scoreName={lens.scoreName}
          />
        ))}
      </>
    );
  }

  return (
    <div data-testid="lens-grid-root" style={styles.root}>
      {title ? <div style={styles.title}>{title}</div> : null}
      <ControlRow label="Lens">
        {lenses.map((l, i) => (
          <Choice
            key={l.name}
            testId="lens-button"
            name={l.name}
            selected={i === lensIndex}
            onSelect={() => setLensIndex(i)}
          />
        ))}
      </ControlRow>
      {diffMode ? (
        <ControlRow label="View">
          {[-1, 0, 1].map((v) => (
            <Choice
              key={v}
              testId="view-button"
              name={v < 0 ? `difference (${runs![1]} − ${runs![0]})` : runs![v]}
              selected={v === view}
              onSelect={() => setView(v)}
            />
          ))}
        </ControlRow>
      ) : null}
      <ControlRow label="Colour">
        {viewMetrics.map((m) => (
          <Choice
            key={m.key}
            testId="metric-button"
            name={m.name}
            value={m.key}
            selected={metric !== undefined && m.key === metric.key}
            onSelect={() => setMetricKey(m.key)}
          />
        ))}
      </ControlRow>
      <ControlRow label="Show">
        <Choice
          testId="compact-button"
          name="compact"
          selected={compact}
          onSelect={() => setCompact(!compact)}
        />
        {bos ? (
          <Choice
            testId="bos-button"
            name="hide BOS"
            selected={hideBos}
            onSelect={() => setHideBos(!hideBos)}
          />
        ) : null}
        <span style={{ marginLeft: 8 }}>zoom</span>
        <input
          data-testid="zoom"
          type="range"
          min={0.5}
          max={2}
          step={0.1}
          value={zoom}
          onChange={(ev) => setZoom(parseFloat(ev.target.value))}
          style={{ verticalAlign: "middle", width: 100 }}
        />
        <span data-testid="zoom-value">{Math.round(zoom * 100)}%</span>
      </ControlRow>
      {metric ? <Legend metric={metric} /> : null}
      <div style={styles.body}>
        <div style={styles.gridScroll}>
          <table
            data-testid="lens-grid"
            data-lens={lens.name}
            data-compact={compact ? "true" : "false"}
            style={{ ...styles.table, fontSize }}
          >
            <thead>
              <tr>
                <th style={{ ...styles.corner }}>entry \ pos</th>
                {columns.map((p) => (
                  <th
                    key={p}
                    data-testid="col-header"
                    data-pos={p}
                    data-token-id={tokenIds ? tokenIds[p] : undefined}
                    title={tokenTitle(p) || undefined}
                    style={{ ...styles.colHeader, ...sized, padding: compact ? "1px 2px" : "2px 4px" }}
                  >
                    <div style={{ color: "#888", fontWeight: "normal" }}>{positions[p]}</div>
                    <div style={styles.cellText}>{displayToken(tokens[p])}</div>
                  </th>
                ))}
              </tr>
            </thead>
            <tbody>
              {labels.map((label, e) => (
                <tr key={label}>
                  <th data-testid="row-header" style={styles.rowHeader}>
                    {label}
                  </th>
                  {columns.map((p) => cell(e, p))}
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        <div data-testid="details" style={styles.details}>
          {details}
        </div>
      </div>
    </div>
  );
}

/** The top-k tokens of one cell in one run. */
function TopK({
  title,
  run,
  tokens,
  ids,
  probs,
  scores,
  scoreName
}: {
  title?: string;
  run: number;
  tokens: string[];
  ids?: number[];
  probs: number[];
  scores: number[];
  scoreName: string;
}) {
  return (
    <div data-testid="topk" data-run={run} style={{ marginBottom: 8 }}>
      {title ? <div style={{ fontWeight: "bold" }}>{title}</div> : null}
      <table style={{ borderCollapse: "collapse", width: "100%" }}>
        <thead>
          <tr style={{ color: "#666", textAlign: "left" }}>
            <th style={styles.topkCell}>#</th>
            <th style={styles.topkCell}>token</th>
            {ids ? <th style={{ ...styles.topkCell, textAlign: "right" }}>id</th> : null}
            <th style={{ ...styles.topkCell, textAlign: "right" }}>p</th>
            <th style={{ ...styles.topkCell, textAlign: "right" }}>{scoreName}</th>
          </tr>
        </thead>
        <tbody>
          {tokens.map((tok, i) => (
            <tr key={i} data-testid="topk-row">
              <td style={styles.topkCell}>{i}</td>
              <td data-testid="topk-token" style={{ ...styles.topkCell, ...styles.token }}>
                {displayToken(tok)}
              </td>
              {ids ? (
                <td data-testid="topk-id" style={{ ...styles.topkCell, textAlign: "right", color: "#555" }}>
                  {ids[i]}
                </td>
              ) : null}
              <td
                data-testid="topk-prob"
                style={{
                  ...styles.topkCell,
                  textAlign: "right",
                  // A bar behind the number: its width is the probability.
                  background: `linear-gradient(to left, rgba(30, 136, 229, 0.35) ${(
                    probs[i] * 100
                  ).toFixed(1)}%, transparent 0)`
                }}
              >
                {formatProb(probs[i])}
              </td>
              <td style={{ ...styles.topkCell, textAlign: "right" }}>{scores[i].toFixed(3)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

function ControlRow({ label, children }: { label: string; children: ReactNode }) {
  return (
    <div style={{ marginBottom: 4 }}>
      <span style={{ display: "inline-block", width: 56, fontWeight: "bold" }}>{label}:</span>
      {children}
    </div>
  );
}

/** A selector button in CircuitsVis's style: black when selected, white otherwise. */
function Choice({
  testId,
  name,
  value,
  selected,
  onSelect
}: {
  testId: string;
  name: string;
  value?: string;
  selected: boolean;
  onSelect: () => void;
}) {
  return (
    <button
      type="button"
      data-testid={testId}
      data-name={name}
      data-value={value}
      aria-pressed={selected}
      onClick={onSelect}
      style={{
        padding: "1px 6px",
        margin: "0 4px 2px 0",
        border: "1px solid black",
        borderRadius: 2,
        backgroundColor: selected ? "black" : "white",
        color: selected ? "white" : "black",
        cursor: "pointer",
        font: "inherit"
      }}
    >
      {name}
    </button>
  );
}

const MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace";
const CELL_WIDTH = 76;
const COMPACT_WIDTH = 34;

const styles: Record<string, CSSProperties> = {
  root: {
    fontFamily: "-apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Arial, sans-serif",
    fontSize: 13,
    color: "black",
    backgroundColor: "white",
    padding: 6
  },
  title: { fontWeight: "bold", fontSize: 15, marginBottom: 6 },
  body: { display: "flex", alignItems: "flex-start", gap: 12 },
  gridScroll: { overflowX: "auto", flex: "0 1 auto", minWidth: 0 },
  table: { borderCollapse: "collapse", fontFamily: MONO, fontSize: 12, tableLayout: "fixed" },
  corner: {
    position: "sticky",
    left: 0,
    backgroundColor: "white",
    color: "#888",
    fontWeight: "normal",
    fontSize: 10,
    padding: "2px 6px",
    textAlign: "right",
    zIndex: 1
  },
  colHeader: {
    width: CELL_WIDTH,
    minWidth: CELL_WIDTH,
    maxWidth: CELL_WIDTH,
    padding: "2px 4px",
    borderBottom: "1px solid #999",
    textAlign: "left",
    verticalAlign: "bottom"
  },
  rowHeader: {
    position: "sticky",
    left: 0,
    backgroundColor: "white",
    padding: "1px 6px",
    textAlign: "right",
    fontWeight: "normal",
    whiteSpace: "nowrap",
    borderRight: "1px solid #999",
    zIndex: 1
  },
  cell: {
    width: CELL_WIDTH,
    minWidth: CELL_WIDTH,
    maxWidth: CELL_WIDTH,
    padding: "1px 4px",
    border: "1px solid white",
    cursor: "pointer",
    verticalAlign: "top"
  },
  cellText: {
    display: "block",
    overflow: "hidden",
    textOverflow: "ellipsis",
    whiteSpace: "pre"
  },
  // The base run's token, struck through: the cell's font size, in a dark grey that stays
  // legible on the colours of the diverging scale.
  cellBase: {
    display: "block",
    overflow: "hidden",
    textOverflow: "ellipsis",
    whiteSpace: "pre",
    textDecoration: "line-through",
    textDecorationThickness: 1,
    fontWeight: "normal"
  },
  details: {
    flex: "0 0 280px",
    width: 280,
    position: "sticky",
    top: 0,
    border: "1px solid #ccc",
    padding: 6,
    backgroundColor: "white"
  },
  token: { fontFamily: MONO, whiteSpace: "pre", backgroundColor: "#f3f3f3" },
  topkCell: { padding: "1px 4px" }
};

export interface LensGridProps {
  /** Row labels: the residual-stack entries, `"0_pre"` ... `"final_post"`. Length E. */
  labels: string[];
  /** Column headers: the input token at each shown position. Length P. */
  tokens: string[];
  /** Their token ids (shown on hover). Length P. */
  tokenIds?: number[];
  /** A note per token, e.g. the bytes of a token that is part of one character. Length P. */
  tokenNotes?: string[];
  /** Column 0 holds the BOS token (its readouts are junk; a toggle hides it). */
  bos?: boolean;
  /** Hide the BOS column at first. */
  hideBos?: boolean;
  /** Open in compact mode (narrow columns), for long prompts. */
  compact?: boolean;
  /** Each column's position in the input. Length P. */
  positions: number[];
  /** The lenses to switch between (at least one). */
  lenses: LensGridLens[];
  /** Difference mode: the names of the two runs, base first (e.g. `["clean", "patched"]`). */
  runs?: string[];
  /** A title over the grid. */
  title?: string;
  /** Index of the lens shown first. */
  initialLens?: number;
  /** Key of the metric shown first. */
  initialMetric?: string;
  /** View shown first: a run index, or -1 for the difference (the default in difference mode). */
  initialView?: number;
}
