import { useState, type CSSProperties } from "react";
import { colorOf, intensity, textColorOf } from "./colors";
import { displayToken, formatValue } from "./format";
import { Legend, type LegendMetric } from "./Legend";
import { useHoverLock } from "./useHoverLock";

/** The metric a drift view colours by (a lens-grid metric without its values). */
export interface TokenDriftMetric extends LegendMetric {
  /** Its name in `LensResult.to_dataframe()`, e.g. `"own_cosine"`. */
  key: string;
}

export interface TokenDriftProps {
  /** Title over the view. */
  title?: string;
  /** The lens read, e.g. `"embedding"`. */
  lens?: string;
  /** The input tokens at the shown positions. Length P. */
  tokens: string[];
  /** Their ids. Length P. */
  tokenIds?: number[];
  /** A note per token (e.g. its bytes when it is part of one character). Length P. */
  tokenNotes?: string[];
  /** Each token's position in the input. Length P. */
  positions: number[];
  /** The stack entries offered, `"0_pre"` ... `"final_post"`. Length E. */
  labels: string[];
  /** The metric at each entry and token, shape [entry][pos]; null where there is none. */
  values: (number | null)[][];
  /** How the values are coloured, printed and explained. */
  metric: TokenDriftMetric;
  /** The entry shown first (the python side picks the one whose colours vary most). */
  initialEntry?: number;
  /** Position 0 holds the BOS token. */
  bos?: boolean;
  /** Hide the BOS token at first. */
  hideBos?: boolean;
}

/**
 * Token drift
 *
 * The input's tokens, coloured by one metric at one stack entry. A slider (or the entry
 * buttons) moves through the entries; hovering a token lists its value at every entry, each
 * with its colour, and clicking keeps it shown.
 */
export function TokenDrift({
  title,
  tokens,
  tokenIds,
  tokenNotes,
  positions,
  labels,
  values,
  metric,
  initialEntry = 0,
  bos = false,
  hideBos: initialHideBos = false
}: TokenDriftProps) {
  const [entry, setEntry] = useState<number>(Math.min(Math.max(initialEntry, 0), labels.length - 1));
  const [hideBos, setHideBos] = useState<boolean>(bos && initialHideBos);
  const { focused, onClick, onMouseEnter, onMouseLeave } = useHoverLock();
  const shown = tokens.map((_t, p) => p).filter((p) => !(bos && hideBos && p === 0));

  let details = (
    <div style={{ color: "#666" }}>Hover over a token to see its value at every entry; click to keep it.</div>
  );
  if (focused !== null && focused < tokens.length) {
    const p = focused;
    details = (
      <div data-testid="drift-details">
        <div style={{ fontWeight: "bold", marginBottom: 4 }}>
          position {positions[p]} <span style={styles.token}>{displayToken(tokens[p])}</span>
          {tokenIds ? <span style={{ fontWeight: "normal", color: "#555" }}> id {tokenIds[p]}</span> : null}
        </div>
        {tokenNotes && tokenNotes[p] ? <div style={{ color: "#555", marginBottom: 4 }}>{tokenNotes[p]}</div> : null}
        <table style={{ borderCollapse: "collapse" }}>
          <tbody>
            {labels.map((label, e) => {
              const v = values[e][p];
              return (
                <tr key={label} data-testid="drift-details-row" style={{ fontWeight: e === entry ? "bold" : "normal" }}>
                  <td style={{ padding: "0 6px 0 0", textAlign: "right" }}>{label}</td>
                  <td style={{ padding: 0 }}>
                    <span
                      style={{
                        display: "inline-block",
                        width: 14,
                        height: 10,
                        border: "1px solid #ccc",
                        backgroundColor: colorOf(intensity(v, metric))
                      }}
                    />
                  </td>
                  <td data-testid="drift-details-value" style={{ padding: "0 0 0 6px", textAlign: "right" }}>
                    {formatValue(v, metric)}
                  </td>
                </tr>
              );
            })}
          </tbody>
        </table>
      </div>
    );
  }

  return (
    <div data-testid="drift-root" style={styles.root}>
      {title ? (
        <div data-testid="drift-title" style={styles.title}>
          {title}
        </div>
      ) : null}
      <div style={{ marginBottom: 4 }}>
        <b>Entry:</b>{" "}
        <input
          data-testid="drift-slider"
          type="range"
          min={0}
          max={labels.length - 1}
          step={1}
          value={entry}
          onChange={(ev) => setEntry(parseInt(ev.target.value, 10))}
          style={{ verticalAlign: "middle", width: Math.min(480, 16 * labels.length + 40) }}
        />{" "}
        <b data-testid="drift-entry">{labels[entry]}</b>
        {bos ? (
          <button
            type="button"
            data-testid="bos-button"
            aria-pressed={hideBos}
            onClick={() => setHideBos(!hideBos)}
            style={{ ...styles.button, marginLeft: 12, ...(hideBos ? styles.selected : {}) }}
          >
            hide BOS
          </button>
        ) : null}
      </div>
      <div style={{ marginBottom: 4 }}>
        {labels.map((label, e) => (
          <button
            key={label}
            type="button"
            data-testid="drift-entry-button"
            data-name={label}
            aria-pressed={e === entry}
            onClick={() => setEntry(e)}
            style={{ ...styles.button, ...(e === entry ? styles.selected : {}) }}
          >
            {label}
          </button>
        ))}
      </div>
      <Legend metric={metric} />
      <div style={{ display: "flex", alignItems: "flex-start", gap: 12 }}>
        <div data-testid="drift-tokens" style={styles.tokens}>
          {shown.map((p) => {
            const t = intensity(values[entry][p], metric);
            return (
              <span
                key={p}
                data-testid="drift-token"
                data-pos={p}
                data-value={values[entry][p] ?? ""}
                title={[tokenIds ? `id ${tokenIds[p]}` : "", tokenNotes ? tokenNotes[p] : ""].filter((x) => x).join(" · ")}
                onMouseEnter={() => onMouseEnter(p)}
                onMouseLeave={onMouseLeave}
                onClick={() => onClick(p)}
                style={{
                  ...styles.tokenBox,
                  backgroundColor: colorOf(t),
                  color: textColorOf(t),
                  outline: focused === p ? "2px solid black" : "none"
                }}
              >
                {displayToken(tokens[p])}
              </span>
            );
          })}
        </div>
        <div data-testid="details" style={styles.details}>
          {details}
        </div>
      </div>
    </div>
  );
}

const MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace";

const styles: Record<string, CSSProperties> = {
  root: {
    fontFamily: "-apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Arial, sans-serif",
    fontSize: 13,
    color: "black",
    backgroundColor: "white",
    padding: 6
  },
  title: { fontWeight: "bold", fontSize: 15, marginBottom: 6 },
  tokens: { flex: "1 1 auto", lineHeight: "26px", fontFamily: MONO, fontSize: 13, maxWidth: 900 },
  tokenBox: {
    display: "inline-block",
    whiteSpace: "pre",
    padding: "1px 3px",
    margin: "1px 1px",
    border: "1px solid #ddd",
    borderRadius: 2,
    cursor: "pointer",
    lineHeight: "18px"
  },
  details: {
    flex: "0 0 240px",
    width: 240,
    border: "1px solid #ccc",
    padding: 6,
    backgroundColor: "white",
    fontSize: 12
  },
  button: {
    padding: "0 4px",
    margin: "0 3px 2px 0",
    border: "1px solid black",
    borderRadius: 2,
    backgroundColor: "white",
    color: "black",
    cursor: "pointer",
    font: "inherit",
    fontSize: 11
  },
  selected: { backgroundColor: "black", color: "white" },
  token: { fontFamily: MONO, whiteSpace: "pre", backgroundColor: "#f3f3f3" }
};
