/**
 * The panel's settings, as the registry gives them from schema/plugin.json. The schema restates
 * the defaults below (JSON cannot import them); a unit test keeps the two equal.
 */
import { DEFAULT_REFRESH_SECONDS } from './protocol';

/** What the panel's settings control. */
export interface IPanelSettings {
  /** `refreshRate`: seconds between the kernel's periodic device refreshes (0: events only). */
  refresh: number;
  /** `devices`: device ids to show (empty: all). */
  devices: string[];
}

/** The settings before the registry has loaded them. */
export const DEFAULT_SETTINGS: Readonly<IPanelSettings> = {
  refresh: DEFAULT_REFRESH_SECONDS,
  devices: []
};

/** The settings from the registry's composite value of each key (undefined: the default). */
export function panelSettings(
  composite: (key: 'refreshRate' | 'devices') => unknown
): IPanelSettings {
  const devices = composite('devices') as string[] | undefined;
  return {
    refresh: Number(composite('refreshRate') ?? DEFAULT_SETTINGS.refresh),
    devices: devices ?? [...DEFAULT_SETTINGS.devices]
  };
}
