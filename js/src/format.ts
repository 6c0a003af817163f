/** How values and tokens are written in the views. */

/** What printing a metric's value needs to know. */
export interface ValueFormat {
  format: "percent" | "number" | "integer" | "bool";
  unit?: string;
  scale: "sequential" | "diverging";
}

/**
 * Tokens as shown: spaces kept (a leading space is part of the token), line breaks and tabs
 * drawn as visible symbols; a token of whitespace only is drawn with open boxes (␣ a space, ⍽ a
 * no-break space, · any other), the empty token as ∅, so that no cell looks empty.
 */
export function displayToken(token: string): string {
  if (token === "") return "\u2205";
  const shown = token.replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  if (!/^\s+$/.test(shown)) return shown;
  return shown.replace(/ /g, "\u2423").replace(/\u00a0/g, "\u237d").replace(/\s/g, "\u00b7");
}

export function formatProb(p: number): string {
  const pct = p * 100;
  if (pct === 0) return "0%";
  return pct >= 0.1 ? `${pct.toFixed(1)}%` : `${pct.toPrecision(2)}%`;
}

/** A number with about four significant digits, without a long tail of decimals. */
function formatNumber(value: number): string {
  const a = Math.abs(value);
  if (a === 0) return "0";
  if (a >= 100) return value.toFixed(1);
  if (a >= 0.01) return value.toFixed(3);
  return value.toPrecision(2);
}

export function formatValue(value: number | null, metric: ValueFormat): string {
  if (value === null || !Number.isFinite(value)) return "–";
  const signed = metric.scale === "diverging";
  const sign = signed && value > 0 ? "+" : "";
  switch (metric.format) {
    case "percent": {
      const pct = value * 100;
      const text = Math.abs(pct) >= 0.1 || pct === 0 ? pct.toFixed(1) : pct.toPrecision(2);
      return signed ? `${sign}${text} pp` : `${text}%`;
    }
    case "integer":
      return `${sign}${Math.round(value)}`;
    case "bool":
      return value ? "yes" : "no";
    default:
      return `${sign}${formatNumber(value)}${metric.unit ? ` ${metric.unit}` : ""}`;
  }
}

/** A number with at most `digits` significant digits and no trailing zeros ("0.9", "0.1235"). */
export function formatSig(value: number | null, digits = 4): string {
  if (value === null || !Number.isFinite(value)) return "n/a";
  return String(Number(value.toPrecision(digits)));
}
