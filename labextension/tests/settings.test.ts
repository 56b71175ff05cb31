/** The settings schema restates the TypeScript defaults (JSON cannot import): keep them equal. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import { DEFAULT_REFRESH_SECONDS } from '../src/protocol';
import { DEFAULT_SETTINGS, panelSettings } from '../src/settings';
import schema from '../schema/plugin.json';

describe('schema/plugin.json', () => {
  it('defaults the refresh rate to DEFAULT_REFRESH_SECONDS', () => {
    assert.equal(
      schema.properties.refreshRate.default,
      DEFAULT_REFRESH_SECONDS
    );
  });

  it('has the defaults the panel starts with, under the keys it reads', () => {
    const fromSchema = panelSettings(key => schema.properties[key].default);
    assert.deepEqual(fromSchema, DEFAULT_SETTINGS);
  });

  it('falls back to the defaults for a key the registry does not give', () => {
    assert.deepEqual(
      panelSettings(() => undefined),
      DEFAULT_SETTINGS
    );
  });
});
