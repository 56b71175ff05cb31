// SVG files are bundled as strings by the builder's asset rule.
declare module '*.svg' {
  const value: string;
  export default value;
}
