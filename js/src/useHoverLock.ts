import { useState } from "react";

export interface UseHoverLockState {
  /** The hovered element, else the locked (clicked) one, else null. */
  focused: number | null;
  onClick: (element: number) => void;
  onMouseEnter: (element: number) => void;
  onMouseLeave: () => void;
}

/**
 * Track which element of a set is focused: hovering shows an element, clicking locks it (and
 * clicking it again unlocks), as CircuitsVis's `useHoverLock` does.
 */
export function useHoverLock(initiallyLocked: number | null = null): UseHoverLockState {
  const [hovered, setHovered] = useState<number | null>(null);
  const [locked, setLocked] = useState<number | null>(initiallyLocked);
  return {
    focused: hovered ?? locked,
    onClick: (element) => setLocked((current) => (current === element ? null : element)),
    onMouseEnter: (element) => setHovered(element),
    onMouseLeave: () => setHovered(null)
  };
}
