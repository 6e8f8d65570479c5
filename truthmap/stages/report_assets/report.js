// truthmap report: draws the page from the JSON in #truthmap-data (written by truthmap/stages/report.py).
// Every string that comes from a dataset or a model is inserted as text (text nodes, textContent,
// attribute values) and never as markup: this file does not use innerHTML, outerHTML,
// insertAdjacentHTML, document.write, eval or URLs built from data.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("truthmap-data").textContent);
  const RUNS = DATA.runs;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const NO_VALUE = "#dddddd"; // grey: a cell with no AUC, as in the PNG
  const REGION = "#000000"; // outline of the best region (chosen on validation), as in the PNG
  const CHOSEN = "#f0a000"; // the verdict's chosen cell, as the paper figure's circle
  const WRONG = "#d55e00", RIGHT = "#0072b2"; // Okabe-Ito vermillion and blue: apart for colour-blind readers

  // ---- small helpers -------------------------------------------------------------------------
  function h(tag, props, children) {
    const node = document.createElement(tag);
    setProps(node, props);
    append(node, children);
    return node;
  }

  function s(tag, attrs, children) {
    const node = document.createElementNS(SVG_NS, tag);
    setProps(node, attrs);
    append(node, children);
    return node;
  }

  function setProps(node, props) {
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.setAttribute("class", value);
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function append(node, children) {
    for (const child of [].concat(children === undefined ? [] : children)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "object" ? child : String(child)); // strings become text nodes
    }
  }

  function fmt(value, digits) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits === undefined ? 3 : digits);
  }

  function count(value) {
    if (value === null || value === undefined) return "–";
    return Number.isInteger(value) ? String(value) : value.toFixed(1);
  }

  function pct(value) {
    return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%";
  }

  function colour(palette, t) {
    const k = Math.round(Math.min(1, Math.max(0, t)) * (palette.length - 1));
    return palette[k];
  }

  // where an AUC sits on the colour bar (0..1): two slopes that meet at chance, as the PNG's (figures.auc_norm),
  // so that AUC below 0.5 (a probe ranking the wrong way) is red and never looks like chance
  const SCALE = DATA.auc_scale;
  function aucPosition(auc) {
    const v = Math.min(SCALE.high, Math.max(SCALE.low, auc));
    return v < SCALE.chance ? 0.5 * (v - SCALE.low) / (SCALE.chance - SCALE.low)
      : 0.5 + 0.5 * (v - SCALE.chance) / (SCALE.high - SCALE.chance);
  }

  function aucColour(auc) {
    return auc === null ? NO_VALUE : colour(DATA.palette.auc, aucPosition(auc));
  }

  function aucShade(auc) { // how far from white: decides the ink of a cell's value
    return Math.abs(aucPosition(auc) - 0.5) * 2;
  }

  function signed(value, digits) { // +0.061, −0.018 (a minus sign, not a hyphen)
    if (value === null || value === undefined) return "–";
    return (value < 0 ? "−" : "+") + fmt(Math.abs(value), digits);
  }

  function interval(low, high, digits) { // "0.80 … 0.90": never broken inside a number (see .num in the CSS)
    return low === null || low === undefined || high === null || high === undefined ? "–"
      : fmt(low, digits) + " … " + fmt(high, digits);
  }

  function inkOn(t) { // dark text on light cells, white on dark ones
    return t > 0.55 ? "#ffffff" : "#111111";
  }

  let uid = 0;
  function newId(prefix) {
    uid += 1;
    return prefix + "-" + uid;
  }

  // ---- scores: uint16 little-endian, [layers, positions, n_test] per (site, seed) ------------
  const decoded = new Map();

  function scoreView(runIndex, site, seed) {
    const key = runIndex + "\u0000" + site + "\u0000" + seed;
    if (!decoded.has(key)) {
      const binary = atob(RUNS[runIndex].scores[site][seed]);
      const bytes = new Uint8Array(binary.length);
      for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
      decoded.set(key, new DataView(bytes.buffer));
    }
    return decoded.get(key);
  }

  // The test answers one cell scored under one seed: [{row, score, wrong}], row indexes run.answers.
  function cellScores(runIndex, site, seed, li, pi) {
    const run = RUNS[runIndex];
    const rows = run.test_rows[seed];
    const view = scoreView(runIndex, site, seed);
    const base = (li * run.positions.length + pi) * rows.length;
    const out = [];
    for (let k = 0; k < rows.length; k++) {
      const q = view.getUint16((base + k) * 2, true);
      if (q !== DATA.missing) {
        out.push({row: rows[k], score: q / DATA.score_scale, wrong: !run.answers.correct[rows[k]]});
      }
    }
    return out;
  }

  // ROC of P(error) scores, wrong answers positive; tied scores form one step (AUC counts ties half).
  function roc(items) {
    const positives = items.filter((x) => x.wrong).length;
    const negatives = items.length - positives;
    if (!positives || !negatives) return null;
    const sorted = items.slice().sort((a, b) => b.score - a.score);
    const points = [[0, 0]];
    let tp = 0, fp = 0, area = 0;
    for (let i = 0; i < sorted.length;) {
      let j = i, dtp = 0, dfp = 0;
      while (j < sorted.length && sorted[j].score === sorted[i].score) {
        if (sorted[j].wrong) dtp += 1; else dfp += 1;
        j += 1;
      }
      area += (dfp / negatives) * ((tp + dtp / 2) / positives);
      tp += dtp;
      fp += dfp;
      points.push([fp / negatives, tp / positives]);
      i = j;
    }
    return {points: points, auc: area};
  }

  // ---- the tooltip shared by every heatmap ---------------------------------------------------
  const tip = h("div", {id: "tip", role: "tooltip", class: "tip", hidden: true});

  function showTip(cell, lines) {
    tip.replaceChildren(...lines.map((line, k) => h("div", {class: k === 0 ? "tip-head" : null}, line)));
    tip.hidden = false;
    const box = cell.getBoundingClientRect();
    const width = tip.offsetWidth, height = tip.offsetHeight;
    let left = box.right + 8, top = box.top - 4;
    if (left + width > window.innerWidth - 4) left = Math.max(4, box.left - width - 8);
    if (top + height > window.innerHeight - 4) top = Math.max(4, window.innerHeight - height - 4);
    tip.style.left = left + "px";
    tip.style.top = top + "px";
  }

  function hideTip() {
    tip.hidden = true;
  }

  // ---- heatmap: layers down, positions across; a grid reachable by Tab, moved in with arrows ----
  // opts: layers, positions, value(li, pi) -> number|null, fill(value) -> colour, shade(value) -> 0..1,
  // label, region [r0, c0, r1, c1] | null, selected [li, pi] | null, describe(li, pi) -> [lines],
  // onSelect(li, pi), showValues, digits, mark(li, pi) -> bool (hatched: does not beat the controls),
  // frame(li, pi) -> bool (framed: a difference beyond noise), chosen [li, pi] | null (the verdict's cell)
  function heatmap(opts) {
    const table = h("table", {class: opts.compact ? "heatmap compact" : "heatmap", role: "grid", "aria-label": opts.label});
    const head = h("tr", {}, h("th", {class: "corner", scope: "col"}, "layer"));
    for (const position of opts.positions) head.append(h("th", {class: "pos", scope: "col"}, h("span", {}, position)));
    table.append(h("thead", {}, head));
    const body = h("tbody");
    const cells = [];
    const region = opts.region;
    const active = opts.selected || [0, 0];
    opts.layers.forEach((layer, li) => {
      const tr = h("tr", {}, h("th", {scope: "row", class: "layer"}, String(layer)));
      const row = [];
      opts.positions.forEach((position, pi) => {
        const value = opts.value(li, pi);
        const td = h("td", {
          role: "gridcell", tabindex: li === active[0] && pi === active[1] ? 0 : -1,
          "data-layer": layer, "data-position": position, "data-li": li, "data-pi": pi,
          "aria-selected": opts.selected && li === opts.selected[0] && pi === opts.selected[1] ? "true" : "false",
        });
        td.style.backgroundColor = opts.fill(value);
        if (value !== null && opts.mark && opts.mark(li, pi)) td.classList.add("below-controls");
        if (value !== null && opts.frame && opts.frame(li, pi)) td.classList.add("beyond-noise");
        if (opts.showValues && value !== null) {
          td.textContent = fmt(value, opts.digits === undefined ? 2 : opts.digits).replace(/^0\./, ".").replace(/^-0\./, "-.");
          td.style.color = inkOn(opts.shade(value));
        }
        const edges = [];
        if (region && li >= region[0] && li <= region[2] && pi >= region[1] && pi <= region[3]) {
          if (li === region[0]) edges.push("inset 0 3px 0 " + REGION);
          if (li === region[2]) edges.push("inset 0 -3px 0 " + REGION);
          if (pi === region[1]) edges.push("inset 3px 0 0 " + REGION);
          if (pi === region[3]) edges.push("inset -3px 0 0 " + REGION);
        }
        if (opts.chosen && li === opts.chosen[0] && pi === opts.chosen[1]) { // the verdict's cell, as ○ in the figure
          td.classList.add("chosen");
          edges.push("inset 0 0 0 3px " + CHOSEN);
        }
        if (edges.length) td.style.boxShadow = edges.join(", ");
        tr.append(td);
        row.push(td);
      });
      cells.push(row);
      body.append(tr);
    });
    table.append(body);

    const cellOf = (target) => (target && target.closest ? target.closest("td[data-li]") : null);
    const at = (td) => [Number(td.dataset.li), Number(td.dataset.pi)];
    const describe = (td) => showTip(td, opts.describe(...at(td)));
    table.addEventListener("mouseover", (e) => { const td = cellOf(e.target); if (td) describe(td); });
    table.addEventListener("mouseleave", hideTip);
    table.addEventListener("focusin", (e) => { const td = cellOf(e.target); if (td) describe(td); });
    table.addEventListener("focusout", hideTip);
    table.addEventListener("click", (e) => { const td = cellOf(e.target); if (td && opts.onSelect) opts.onSelect(...at(td)); });
    table.addEventListener("keydown", (e) => {
      const td = cellOf(e.target);
      if (!td) return;
      let [li, pi] = at(td);
      const moves = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1]};
      if (moves[e.key]) {
        li = Math.min(cells.length - 1, Math.max(0, li + moves[e.key][0]));
        pi = Math.min(cells[0].length - 1, Math.max(0, pi + moves[e.key][1]));
      } else if (e.key === "Home") {
        pi = 0;
      } else if (e.key === "End") {
        pi = cells[0].length - 1;
      } else if ((e.key === "Enter" || e.key === " ") && opts.onSelect) {
        e.preventDefault();
        opts.onSelect(li, pi);
        return;
      } else if (e.key === "Escape") {
        hideTip();
        return;
      } else {
        return;
      }
      e.preventDefault();
      td.tabIndex = -1;
      cells[li][pi].tabIndex = 0;
      cells[li][pi].focus();
    });
    table.markSelected = (li, pi) => { // move the selection without redrawing (keeps keyboard focus)
      for (const row of cells) for (const td of row) td.setAttribute("aria-selected", "false");
      cells[li][pi].setAttribute("aria-selected", "true");
    };
    return h("div", {class: "heatmap-scroll"}, table);
  }

  // A colour bar: palette from lo to hi with ticks, and the grey / outline swatches; ``where(t)`` places a
  // value along the bar (0..1; default linear), ``line`` draws a dashed mark at that value.
  function legend(palette, lo, hi, ticks, title, extras, where, line) {
    const width = 240, bar = 12, pad = 16;
    const at = where || ((t) => (t - lo) / (hi - lo));
    const svg = s("svg", {width: width + 2 * pad, height: 38, viewBox: "0 0 " + (width + 2 * pad) + " 38", role: "img",
      "aria-label": title + ": colour from " + lo + " to " + hi});
    palette.forEach((c, k) => svg.append(s("rect", {x: pad + k * width / palette.length, y: 2,
      width: width / palette.length + 0.5, height: bar, fill: c})));
    svg.append(s("rect", {x: pad, y: 2, width: width, height: bar, fill: "none", stroke: "#555"}));
    if (line !== undefined && line !== null) {
      const x = pad + width * at(line);
      svg.append(s("line", {x1: x, x2: x, y1: 0, y2: 4 + bar, stroke: "#000", "stroke-width": 2, "stroke-dasharray": "3 2",
        class: "control-line"}));
    }
    for (const t of ticks) {
      const x = pad + width * at(t);
      svg.append(s("line", {x1: x, x2: x, y1: 2 + bar, y2: 6 + bar, stroke: "#333"}));
      svg.append(s("text", {x: x, y: 28, "text-anchor": "middle", class: "tick"}, (t < 0 ? "−" : "") + Math.abs(t).toFixed(2).replace(/^0\.00$/, "0")));
    }
    const items = [h("span", {class: "legend-title"}, title), svg];
    for (const extra of extras || []) items.push(extra);
    return h("div", {class: "legend"}, items);
  }

  function swatch(kind, text) {
    const box = h("span", {class: "swatch " + kind, "aria-hidden": "true"});
    if (kind === "none") box.style.background = NO_VALUE;
    return h("span", {class: "legend-item"}, [box, text]);
  }

  // the rule of the hatching, in words (plot.control_level computes the bar)
  function controlRule(control) {
    return "AUC ≤ " + fmt(control.high) + ", the controls' highest upper 95% bound (" + control.name + ", AUC " +
      fmt(control.auc) + ")";
  }

  function aucLegend(control, perRun) {
    const extras = [swatch("none", "no AUC"),
      swatch("region", "best region: chosen on validation AUC (within one standard error of the best)")];
    if (!perRun) extras.push(swatch("chosen", "the chosen cell"));
    if (control) extras.push(swatch("below-controls", "hatched: does not beat the controls — " + controlRule(control) + "; dashed line"));
    else if (perRun) extras.push(swatch("below-controls", "hatched: does not beat its run's controls (AUC ≤ their highest upper 95% bound)"));
    return legend(DATA.palette.auc, SCALE.low, SCALE.high, [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
      "probe AUC (predicting an error; red: below chance)", extras, aucPosition, control ? control.high : null);
  }

  function select(label, options, value, onChange) {
    const id = newId("sel");
    const control = h("select", {id: id, name: label.split(" ")[0]});
    for (const [optionValue, text] of options) {
      const option = h("option", {value: optionValue}, text);
      if (String(optionValue) === String(value)) option.selected = true;
      control.append(option);
    }
    control.addEventListener("change", () => onChange(control.value));
    return h("label", {class: "control", for: id}, [h("span", {}, label), control]);
  }

  // ---- one run -------------------------------------------------------------------------------
  const state = RUNS.map((run) => ({
    site: Object.keys(run.sites)[0], view: "mean", seed: run.seeds[0], cell: null, family: "", task: "", outcome: "",
    values: false,
  }));

  const MEAN_VIEWS = ["mean", "within", "entropy"]; // views over every seed; the others are one seed each

  function viewLabel(run, view) {
    const seeds = run.seeds.length + " seed" + (run.seeds.length === 1 ? "" : "s");
    return view === "mean" ? "mean over " + seeds : view === "within" ? "within strata, mean over " + seeds
      : view === "entropy" ? "semantic-entropy probes (trained without labels), mean over " + seeds
      : "seed " + view;
  }

  function describeCell(run, site, view, li, pi) {
    const table = run.sites[site].views[view];
    const lines = ["layer " + run.sites[site].layers[li] + " · " + run.positions[pi] + " · " + site];
    const auc = table.auc[li][pi];
    if (auc === null) {
      lines.push("no AUC (the test split lacks a class here, or the position never exists)");
    } else {
      lines.push("test AUC " + fmt(auc) + (view === "mean" ? " ± " + fmt(table.auc_std[li][pi]) + " (" + viewLabel(run, view) + ")"
        : " (" + viewLabel(run, view) + ")"));
      if (table.auc_lo[li][pi] !== null) lines.push("95% interval " + fmt(table.auc_lo[li][pi]) + "–" + fmt(table.auc_hi[li][pi]));
      if (table.val_auc && table.val_auc[li][pi] !== null) lines.push("validation AUC " + fmt(table.val_auc[li][pi]));
      if (belowControls(run, view, auc)) lines.push("does not beat the controls: " + controlRule(run.control));
    }
    lines.push("n_train " + count(table.n_train[li][pi]) + (table.n_val ? " · n_val " + count(table.n_val[li][pi]) : "") +
      " · n_test " + count(table.n_test[li][pi]));
    return lines;
  }

  // A cell that does not beat the controls: its AUC at or below their bar (the map's main views only: the
  // controls score every answer, not pairs within strata)
  function belowControls(run, view, auc) {
    return Boolean(run.control) && auc !== null && (view === "mean" || !MEAN_VIEWS.includes(view)) && auc <= run.control.high;
  }

  // [li, pi] of the verdict's chosen cell (or the validation-chosen one) on ``site``'s map; null elsewhere
  function chosenAt(run, site) {
    const verdict = run.summary.verdict;
    const chosen = verdict && verdict.chosen ? verdict.chosen : run.chosen;
    if (!chosen || chosen.site !== site) return null;
    const li = run.sites[site].layers.indexOf(chosen.layer), pi = run.positions.indexOf(String(chosen.position));
    return li < 0 || pi < 0 ? null : [li, pi];
  }

  function renderRun(index) {
    const run = RUNS[index];
    const root = h("div", {class: "run"});
    // phone: verdict, map, comparisons, the rest; wide screen: verdict and comparisons beside the map
    const top = h("div", {class: "run-top"});
    const mapSection = h("section", {class: "panel map", "aria-labelledby": "map-title-" + index});
    const detail = h("section", {class: "panel detail", "aria-labelledby": "detail-title-" + index});
    top.append(verdictPanel(index), mapSection, comparisonsPanel(index), beyondPanel(index), summaryPanel(index));
    root.append(top, detail);
    let table = null;

    function drawMap() {
      const st = state[index];
      const site = run.sites[st.site];
      const view = site.views[st.view];
      const controls = h("div", {class: "controls"}, [
        select("site", Object.keys(run.sites).map((name) => [name, name]), st.site, (v) => {
          if (st.cell) { // keep the same layer where the new site has it (mlp and attention have no layer 0)
            const li = run.sites[v].layers.indexOf(site.layers[st.cell[0]]);
            st.cell = li < 0 ? null : [li, st.cell[1]];
          }
          st.site = v; drawMap(); drawDetail();
        }),
        select("AUC of", MEAN_VIEWS.filter((v) => site.views[v]).map((v) => [v, viewLabel(run, v)])
          .concat(run.seeds.map((seed) => [seed, "seed " + seed])), st.view, (v) => {
          st.view = v;
          if (!MEAN_VIEWS.includes(v)) st.seed = v;
          drawMap(); drawDetail();
        }),
        h("label", {class: "control check"}, [
          h("input", {type: "checkbox", class: "show-values", checked: st.values, onchange: (e) => { st.values = e.target.checked; drawMap(); }}),
          h("span", {}, "show values"),
        ]),
      ]);
      const grid = heatmap({
        layers: site.layers, positions: run.positions, value: (li, pi) => view.auc[li][pi], fill: aucColour,
        shade: aucShade, region: view.region, selected: st.cell, showValues: st.values,
        mark: (li, pi) => belowControls(run, st.view, view.auc[li][pi]), chosen: chosenAt(run, st.site),
        label: "probe AUC, " + st.site + ", " + viewLabel(run, st.view) + ": layers down, token positions across",
        describe: (li, pi) => describeCell(run, st.site, st.view, li, pi),
        onSelect: (li, pi) => { st.cell = [li, pi]; table.markSelected(li, pi); drawDetail(); },
      });
      table = grid.querySelector("table");
      // on a phone the CSS draws the grid right under the heading (the first screen), then legend and controls
      mapSection.replaceChildren(
        h("h2", {id: "map-title-" + index}, "Where the model knows its answer is wrong"),
        controls, aucLegend(run.control), grid,
        h("p", {class: "hint"}, "Each cell: a linear probe on the hidden state at that layer and token position, " +
          "tested on held-out answers. Hover or focus a cell for its numbers; click it, or press Enter, to see its answers."));
    }

    function drawDetail() {
      const st = state[index];
      if (!st.cell) {
        detail.replaceChildren(h("h2", {id: "detail-title-" + index}, "Cell"), h("p", {class: "hint"},
          "Choose a cell of the heatmap (click, or Tab into the map, move with the arrow keys and press Enter)."));
        return;
      }
      const [li, pi] = st.cell;
      const site = run.sites[st.site];
      const layer = site.layers[li], position = run.positions[pi];
      const seed = MEAN_VIEWS.includes(st.view) ? st.seed : st.view;
      const scored = cellScores(index, st.site, seed, li, pi);
      const a = run.answers;
      const families = Array.from(new Set(scored.map((x) => a.family[x.row]))).sort();
      if (st.family && !families.includes(st.family)) st.family = "";
      const tasks = a.task ? Array.from(new Set(scored.map((x) => a.task[x.row]))).sort() : [];
      if (st.task && !tasks.includes(st.task)) st.task = "";
      const outcomeOf = (x) => (x.wrong ? (x.score >= 0.5 ? "caught" : "missed") : (x.score >= 0.5 ? "false alarm" : "passed"));
      const shown = scored.filter((x) => (!st.family || a.family[x.row] === st.family) &&
        (!st.task || a.task[x.row] === st.task) &&
        (!st.outcome || (st.outcome === "wrong" ? x.wrong : st.outcome === "right" ? !x.wrong : outcomeOf(x) === st.outcome)));
      shown.sort((a, b) => b.score - a.score);
      const tableAuc = site.views[String(seed)].auc[li][pi];
      const curve = roc(shown);

      const controls = h("div", {class: "controls"}, [
        select("seed (test split)", run.seeds.map((v) => [v, "seed " + v]), seed, (v) => {
          st.seed = v;
          if (!MEAN_VIEWS.includes(st.view)) st.view = v;
          if (!MEAN_VIEWS.includes(st.view)) drawMap();
          drawDetail();
        }),
        tasks.length > 1 ? select("task", [["", "all tasks"]].concat(tasks.map((t) => [t, t])), st.task, (v) => { st.task = v; drawDetail(); }) : null,
        select("family", [["", "all families"]].concat(families.map((f) => [f, f])), st.family, (v) => { st.family = v; drawDetail(); }),
        select("answers", [["", "all"], ["wrong", "wrong answers"], ["right", "right answers"],
          ["caught", "caught: wrong, P(error) ≥ 0.5"], ["missed", "missed: wrong, P(error) < 0.5"],
          ["false alarm", "false alarms: right, P(error) ≥ 0.5"]], st.outcome, (v) => { st.outcome = v; drawDetail(); }),
      ]);
      const wrongCount = shown.filter((x) => x.wrong).length;
      const facts = h("p", {class: "facts"}, [
        "seed " + seed + " test split · AUC in the table " + fmt(tableAuc) + " · ",
        h("span", {class: "cell-auc"}, curve ? "AUC of the answers listed " + fmt(curve.auc) : "AUC of the answers listed: – (needs right and wrong answers)"),
      ]);
      const rows = shown.map((x, k) => {
        const [before, exact, after] = a.answer[x.row];
        return h("tr", {class: x.wrong ? "wrong" : "right"}, [
          h("td", {class: "num"}, String(k + 1)),
          h("td", {class: "num"}, fmt(x.score)),
          h("td", {}, h("span", {class: "tag " + (x.wrong ? "wrong" : "right")}, x.wrong ? "wrong" : "right")),
          h("td", {}, outcomeOf(x)),
          h("td", {}, a.family[x.row]),
          h("td", {class: "text"}, a.question[x.row]),
          h("td", {class: "text"}, [before, exact ? h("mark", {}, exact) : null, after]),
          h("td", {class: "text"}, a.gold[x.row].join(" | ")),
        ]);
      });
      const list = h("table", {class: "answers"}, [
        h("caption", {class: "count", "aria-live": "polite"}, shown.length + " test answer" + (shown.length === 1 ? "" : "s") +
          " (" + wrongCount + " wrong), most likely wrong first"),
        h("thead", {}, h("tr", {}, ["#", "P(error)", "label", "probe at 0.5", "family", "question", "answer (exact answer marked)", "gold"]
          .map((name) => h("th", {scope: "col"}, name)))),
        h("tbody", {}, rows),
      ]);
      detail.replaceChildren(
        h("h2", {id: "detail-title-" + index}, "Cell: layer " + layer + " · " + position + " · " + st.site),
        controls, facts,
        h("div", {class: "charts"}, [rocChart(curve), histogram(shown)]),
        h("div", {class: "answers-scroll"}, list));
    }

    drawMap();
    drawDetail();
    root.selectCell = (site, li, pi) => {
      state[index].site = site;
      state[index].cell = [li, pi];
      drawMap();
      drawDetail();
      detail.scrollIntoView({block: "start"});
    };
    return root;
  }

  function rocChart(curve) {
    const size = 220, pad = 36;
    const x = (v) => pad + v * size, y = (v) => pad / 3 + (1 - v) * size;
    const svg = s("svg", {class: "chart roc", viewBox: "0 0 " + (size + pad + 10) + " " + (size + pad + 20),
      role: "img", "aria-label": curve ? "ROC curve, AUC " + fmt(curve.auc) : "no ROC curve: one class only"});
    svg.append(s("rect", {x: x(0), y: y(1), width: size, height: size, fill: "#fafafa", stroke: "#999"}));
    svg.append(s("line", {x1: x(0), y1: y(0), x2: x(1), y2: y(1), stroke: "#aaa", "stroke-dasharray": "4 3"}));
    for (const t of [0, 0.5, 1]) {
      svg.append(s("text", {x: x(t), y: y(0) + 14, "text-anchor": "middle", class: "tick"}, String(t)));
      svg.append(s("text", {x: x(0) - 6, y: y(t) + 4, "text-anchor": "end", class: "tick"}, String(t)));
    }
    svg.append(s("text", {x: x(0.5), y: y(0) + 30, "text-anchor": "middle", class: "axis"}, "right answers flagged (FPR)"));
    svg.append(s("text", {x: 10, y: y(0.5), "text-anchor": "middle", class: "axis",
      transform: "rotate(-90 10 " + y(0.5) + ")"}, "wrong answers caught (TPR)"));
    if (curve) {
      svg.append(s("polyline", {points: curve.points.map(([fx, ty]) => x(fx) + "," + y(ty)).join(" "), fill: "none",
        stroke: WRONG, "stroke-width": 2.5}));
      svg.append(s("text", {x: x(0.97), y: y(0.06), "text-anchor": "end", class: "axis"}, "AUC " + fmt(curve.auc)));
    }
    return h("figure", {class: "chart-box"}, [svg, h("figcaption", {}, "ROC curve")]);
  }

  function histogram(items) {
    const bins = 20, width = 300, height = 180, padLeft = 34, padTop = 8;
    const wrong = new Array(bins).fill(0), right = new Array(bins).fill(0);
    for (const x of items) (x.wrong ? wrong : right)[Math.min(bins - 1, Math.floor(x.score * bins))] += 1;
    const top = Math.max(1, ...wrong, ...right);
    const svg = s("svg", {class: "chart histogram", viewBox: "0 0 " + (width + padLeft + 10) + " " + (height + 60),
      role: "img", "aria-label": "histogram of P(error): " + items.filter((x) => x.wrong).length + " wrong and " +
        items.filter((x) => !x.wrong).length + " right answers"});
    const bx = (k) => padLeft + k * width / bins, by = (v) => padTop + height - v / top * height;
    svg.append(s("line", {x1: padLeft, x2: padLeft + width, y1: by(0), y2: by(0), stroke: "#999"}));
    for (let k = 0; k < bins; k++) {
      const w = width / bins / 2 - 0.5;
      if (right[k]) svg.append(s("rect", {x: bx(k), y: by(right[k]), width: w, height: by(0) - by(right[k]), fill: RIGHT},
        s("title", {}, right[k] + " right")));
      if (wrong[k]) svg.append(s("rect", {x: bx(k) + w + 0.5, y: by(wrong[k]), width: w, height: by(0) - by(wrong[k]),
        fill: WRONG}, s("title", {}, wrong[k] + " wrong")));
    }
    for (const t of [0, 0.5, 1]) svg.append(s("text", {x: padLeft + t * width, y: by(0) + 14, "text-anchor": "middle", class: "tick"}, String(t)));
    svg.append(s("text", {x: padLeft - 6, y: by(top) + 8, "text-anchor": "end", class: "tick"}, String(top)));
    svg.append(s("text", {x: padLeft + width / 2, y: by(0) + 30, "text-anchor": "middle", class: "axis"}, "probe P(error)"));
    const key = (colourValue, text, x0) => [
      s("rect", {x: x0, y: by(0) + 40, width: 12, height: 12, fill: colourValue}),
      s("text", {x: x0 + 16, y: by(0) + 50, class: "axis"}, text)];
    svg.append(...key(RIGHT, "right answers", padLeft), ...key(WRONG, "wrong answers", padLeft + 130));
    return h("figure", {class: "chart-box wide"}, [svg, h("figcaption", {}, "Scores of right and wrong answers")]);
  }

  // ---- the verdict: what the run shows, first ------------------------------------------------------
  // summary.json "verdict" (the probe stage): {line, chosen: {site, layer, position, auc, low, high, seed_sd},
  // comparisons: [{against, kind, auc, diff, low, high, p, shown}], beats_controls, n_test, n_test_groups}.
  // A run without one (an older truthmap) shows the validation-chosen cell and the controls' bar.
  function verdictPanel(index) {
    const run = RUNS[index];
    const verdict = run.summary.verdict;
    const panel = h("section", {class: "panel verdict", id: "verdict-" + index, "aria-labelledby": "verdict-title-" + index});
    panel.append(h("h2", {id: "verdict-title-" + index}, "Verdict"));
    const chosen = verdict && verdict.chosen ? verdict.chosen : run.chosen;
    if (verdict && verdict.line) panel.append(h("p", {class: "verdict-line"}, verdict.line));
    else panel.append(h("p", {class: "hint"}, "This run's summary.json holds no verdict (no paired comparisons): " +
      "below, the cell chosen on validation and the controls' bar."));
    if (chosen) {
      const where = "layer " + chosen.layer + " · " + chosen.position + (Object.keys(run.sites).length > 1 ? " · " + chosen.site : "");
      const sizes = verdict && verdict.n_test ? " · " + verdict.n_test + " test answers" +
        (verdict.n_test_groups ? " in " + verdict.n_test_groups + " groups" : "") : "";
      panel.append(h("p", {class: "chosen"}, [
        "Chosen on validation: ", h("strong", {}, where), " — test AUC ",
        h("span", {class: "num"}, fmt(chosen.auc)), " (95% ", h("span", {class: "num"}, interval(chosen.low, chosen.high)), ")",
        chosen.seed_sd === null || chosen.seed_sd === undefined ? "" : ", seeds ± ",
        chosen.seed_sd === null || chosen.seed_sd === undefined ? "" : h("span", {class: "num"}, fmt(chosen.seed_sd)),
        sizes]));
    }
    const warning = controlsWarning(run, verdict, chosen);
    if (warning) panel.append(h("p", {class: "warning", role: "note"}, warning));
    const located = run.summary.exact_answer;  // the label stage's summary: label-blind spans against the gold's
    if (located && located.right_answers) {
      const differ = count(located.span_differs_from_gold) + " of " + count(located.right_answers);
      panel.append(h("p", {class: "hint exact-span"}, located.mode === "gold" ?
        "Right answers' exact answers sit at their matched gold alias (--exact-answer gold); the label-blind locator puts " +
          differ + " of them elsewhere." :
        "Exact answers located without the gold answer: for " + differ + " right answers the span differs from the matched gold alias."));
    }
    return panel;
  }

  // The warning a reader must see before the map, short enough to leave the map on a phone's first screen:
  // the chosen cell does not beat the controls (which ones, and by how much: the comparisons table).
  function controlsWarning(run, verdict, chosen) {
    const lines = [];
    if (verdict && verdict.beats_controls === false) {
      const unshown = (verdict.comparisons || []).filter((c) => c.kind === "control" && !c.shown);
      lines.push("Does not beat the controls" + (unshown.length ? " (" + unshown.length + " of " +
        (verdict.comparisons || []).filter((c) => c.kind === "control").length + " not shown below it)" : "") +
        ": the chosen cell may read what the answer is or looks like, not what the model knows.");
    } else if (!verdict && chosen && run.control && chosen.auc !== null && chosen.auc <= run.control.high) {
      lines.push("Does not beat the controls: " + controlRule(run.control) + ".");
    }
    const controls = run.summary.controls;
    if (controls && controls.exact_answer_confounded) {
      lines.push("The exact-answer columns do not beat the surface control (answer length, exact-answer length " +
        "and route, whether it stopped).");
    }
    return lines.join(" ");
  }

  function comparisonsPanel(index) {
    const run = RUNS[index];
    const verdict = run.summary.verdict;
    const comparisons = verdict && verdict.comparisons ? verdict.comparisons : [];
    const panel = h("section", {class: "panel comparisons", "aria-labelledby": "comparisons-title-" + index});
    if (!comparisons.length) {
      panel.hidden = true;
      return panel;
    }
    panel.append(h("h2", {id: "comparisons-title-" + index}, "The chosen cell against …"));
    panel.append(smallTable("Paired: chosen − other, on the same answers and draws",
      ["against", "AUC", "difference (95%)", "p", "shown"],
      comparisons.map((c) => [h("span", {title: c.kind}, c.against),
        h("span", {class: "num"}, fmt(c.auc)),
        h("span", {class: "num"}, signed(c.diff, 2) + " (" + signed(c.low, 2) + " … " + signed(c.high, 2) + ")"),
        h("span", {class: "num"}, c.p === null || c.p === undefined ? "–" : (c.p < 0.001 ? "<0.001" : fmt(c.p))),
        c.shown ? h("span", {class: "shown", title: "shown: the interval lies above zero"}, "✓") :
          h("span", {class: "not-shown", title: "not shown: the interval reaches zero"}, "–")])));
    panel.append(h("p", {class: "hint"}, "✓ shown: the interval of the difference lies above zero; p: one-sided, of a difference ≤ 0."));
    return panel;
  }

  function beyondPanel(index) { // the whole map as one probe, the per-cell null, graders, cost (analyses/wholemap.py, cost.py)
    const sm = RUNS[index].summary;
    const panel = h("section", {class: "panel beyond", "aria-labelledby": "beyond-title-" + index});
    panel.append(h("h2", {id: "beyond-title-" + index}, "Beyond one cell"));
    const paired = sm.whole_map && sm.whole_map.paired;
    if (paired && paired.diff !== null && paired.diff !== undefined) {
      panel.append(h("p", {}, "The whole map as one probe (every cell's scores stacked): test AUC " + fmt(paired.auc_a) +
        " against the best cell's " + fmt(paired.auc_b) + ", difference " + signed(paired.diff, 3) + " (" +
        signed(paired.low, 3) + " … " + signed(paired.high, 3) + ", paired): " + (paired.shown ? "shown" : "not shown") + "."));
    }
    const nul = sm.cell_null;
    if (nul) {
      panel.append(h("p", {}, count(nul.cells_beating_null) + " of " + count(nul.cells) + " cells beat a label-permutation null " +
        "(the largest AUC over all cells in each of " + count(nul.permutations) + " permutations; p ≤ " + fmt(nul.level, 2) +
        ", resolution " + fmt(nul.p_resolution, 3) + ")."));
    }
    const graders = sm.graders;
    const probed = graders && graders.probes ? graders.probes.filter((g) => !g.note) : [];
    if (probed.length) {
      panel.append(smallTable("Graders: the cell each one's labels choose (probes refitted on them)",
        ["grader (right)", "cell", "test AUC", "at the run's cell"],
        probed.map((g) => [g.grader.replace("correct_", "") + " (" + pct((graders.accuracy || {})[g.grader]) + ")",
          "L" + g.layer + " · " + g.position, h("span", {class: "num"}, fmt(g.auc, 2) + " (" + interval(g.auc_lo, g.auc_hi) + ")"),
          h("span", {class: "num"}, fmt(g.auc_of_correct_cell, 2))])));
    }
    if (graders && graders.agreement && graders.agreement.length) {
      panel.append(smallTable("Graders' agreement", ["graders", "n", "labels that flip", "Cohen's kappa"],
        graders.agreement.map((a) => [a.a.replace("correct_", "") + " · " + a.b.replace("correct_", ""), count(a.n),
          count(a.flips), fmt(a.kappa)])));
    }
    const methods = sm.cost && sm.cost.methods ? sm.cost.methods : [];
    if (methods.length) {
      panel.append(smallTable("Test AUC against extra cost beyond answering (per answer; ◆ the Pareto front of AUC against tokens)",
        ["method", "test AUC", "forward tokens", "seconds"],
        methods.map((m) => [m.method + (m.pareto ? " ◆" : ""), h("span", {class: "num"}, fmt(m.auc)),
          h("span", {class: "num"}, fmt(m.forward_tokens, 1)), h("span", {class: "num"}, fmt(m.seconds, 3))])));
    }
    panel.hidden = panel.childNodes.length <= 1;
    return panel;
  }

  function summaryPanel(index) {
    const run = RUNS[index];
    const sm = run.summary;
    const panel = h("section", {class: "panel summary", "aria-labelledby": "summary-title-" + index});
    const facts = [
      ["model", sm.model], ["revision", sm.model_revision], ["dataset", sm.dataset], ["questions", sm.n],
      ["model accuracy", pct(sm.accuracy)],
      ["valid exact answers", pct(sm.valid_exact_answer_rate) + (sm.valid_exact_answer_rate_wrong === undefined ||
        sm.valid_exact_answer_rate_wrong === null ? "" : " (of wrong answers: " + pct(sm.valid_exact_answer_rate_wrong) + ")")],
      ["layers · hidden size", (sm.n_layers === undefined ? "–" : sm.n_layers) + " · " + (sm.hidden_size === undefined ? "–" : sm.hidden_size)],
      ["seeds", run.seeds.join(", ")],
    ];
    const dl = h("dl", {class: "facts-list"});
    for (const [name, value] of facts) dl.append(h("dt", {}, name), h("dd", {}, value === undefined || value === null ? "–" : String(value)));
    panel.append(h("h2", {id: "summary-title-" + index}, run.name), dl);
    for (const [name, reason] of Object.entries(sm.skipped || {})) {
      panel.append(h("p", {class: "hint skipped"}, name + " skipped: " + reason));
    }

    const families = Object.entries(sm.families || {});
    if (families.length) {
      panel.append(smallTable("Accuracy per family", ["family", "n", "accuracy", "valid exact"],
        families.map(([name, f]) => [name, String(f.n), pct(f.accuracy), pct(f.valid_exact_answer_rate)])));
    }
    const top = sm.top_cells || [];
    if (top.length) {
      const rows = top.map((c) => {
        const siteTable = run.sites[c.site];
        const li = siteTable ? siteTable.layers.indexOf(c.layer) : -1, pi = run.positions.indexOf(String(c.position));
        const name = "layer " + c.layer + " · " + c.position + (Object.keys(run.sites).length > 1 ? " · " + c.site : "");
        const go = li >= 0 && pi >= 0
          ? h("button", {type: "button", class: "link", onclick: () => document.getElementById("run-" + index).selectCell(c.site, li, pi)}, name)
          : name;
        return [go, fmt(c.val_auc), fmt(c.auc), fmt(c.auc_lo) + "–" + fmt(c.auc_hi)];
      });
      panel.append(smallTable("Best cells, chosen on validation", ["cell", "val AUC", "test AUC", "95% interval"], rows));
    }
    const pop = sm.population;
    if (pop) {
      panel.append(h("p", {class: "hint"}, "Every cell is scored on the same " + pop.n + " answers (population " + pop.rule +
        "; " + pop.left_out + " left out: " + Object.entries(pop.left_out_reasons || {}).map(([r, n]) => r + " " + n).join(", ") +
        "). Splits keep related questions together (" + (pop.groups ? pop.groups.n + " groups, the largest " + pop.groups.largest : "") + ")."));
    }
    const onTest = sm.best_on_test;
    if (onTest && sm.best_cell) {
      panel.append(h("p", {class: "hint"}, "Chosen on test instead, the best cell would be layer " + onTest.layer + " · " +
        onTest.position + " with test AUC " + fmt(onTest.auc) + " (optimistic: the best of many on the answers that score it)."));
    }
    const controls = sm.controls;
    if (controls) {
      const rows = [];
      if (controls.best_exact_answer_cell) rows.push(["best exact-answer cell", fmt(controls.best_exact_answer_cell.auc)]);
      if (controls.best_other_cell) rows.push(["best other cell", fmt(controls.best_other_cell.auc)]);
      // the controls are the run's baseline rows of kind "control" (their names and labels: the baseline registry)
      run.baselines.filter((b) => b.kind === "control" && b.auc !== null).forEach((b) => rows.push([b.label, fmt(b.auc)]));
      if (rows.length) panel.append(smallTable("Controls (test AUC)", ["", "AUC"], rows));
    }
    if (run.baselines.length) {
      panel.append(smallTable("Baselines (same test splits)", ["baseline", "AUC", "95% interval", "n_test"],
        run.baselines.map((b) => [b.name + (b.site === "baseline" ? "" : " (" + b.site + ")"),
          fmt(b.auc) + " ± " + fmt(b.auc_std), fmt(b.auc_lo) + "–" + fmt(b.auc_hi), count(b.n_test)])));
    }
    const reasons = Object.entries(sm.invalid_exact_answer_reasons || {});
    if (reasons.length) {
      panel.append(smallTable("No exact answer found", ["reason", "answers"], reasons.map(([r, n]) => [r, String(n)])));
    }
    const stages = Object.entries(sm.stage_seconds || {});
    if (stages.length) {
      const rows = stages.map(([name, sec]) => [name, fmt(sec, 1) + " s"]);
      if (sm.wall_seconds !== undefined) rows.push(["last truthmap run (all of it)", fmt(sm.wall_seconds, 1) + " s"]);
      panel.append(smallTable("Stage times", ["stage", "seconds"], rows));
    }
    const versions = Object.entries(sm.versions || {});
    if (versions.length) {
      const list = h("dl", {class: "facts-list"});
      for (const [name, v] of versions) list.append(h("dt", {}, name), h("dd", {}, String(v)));
      panel.append(h("details", {}, [h("summary", {}, "Versions"), list]));
    }
    return panel;
  }

  function smallTable(title, columns, rows) {
    return h("div", {class: "small-table"}, h("table", {}, [
      h("caption", {}, title),
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", {scope: "col"}, c)))),
      h("tbody", {}, rows.map((row) => h("tr", {}, row.map((v) => h("td", {}, v))))),
    ]));
  }

  // ---- several runs: side by side, and B − A ---------------------------------------------------
  const compare = {site: null, a: 0, b: Math.min(1, RUNS.length - 1), values: false};

  function renderCompare() {
    const root = h("div", {class: "compare", id: "compare"});
    const sites = Array.from(new Set(RUNS.flatMap((run) => Object.keys(run.sites))));
    if (!compare.site || !sites.includes(compare.site)) compare.site = sites[0];

    function draw() {
      const runOptions = RUNS.map((run, k) => [k, run.name]);
      const controls = h("div", {class: "controls"}, [
        select("site", sites.map((v) => [v, v]), compare.site, (v) => { compare.site = v; draw(); }),
        select("A", runOptions, compare.a, (v) => { compare.a = Number(v); draw(); }),
        select("B", runOptions, compare.b, (v) => { compare.b = Number(v); draw(); }),
        h("label", {class: "control check"}, [
          h("input", {type: "checkbox", checked: compare.values, onchange: (e) => { compare.values = e.target.checked; draw(); }}),
          h("span", {}, "show values"),
        ]),
      ]);
      const side = h("div", {class: "side-by-side"});
      RUNS.forEach((run, k) => {
        const site = run.sites[compare.site];
        if (!site) {
          side.append(h("figure", {class: "run-map"}, [h("figcaption", {}, run.name), h("p", {}, "no " + compare.site + " probes in this run")]));
          return;
        }
        const view = site.views.mean;
        side.append(h("figure", {class: "run-map", "data-run": k}, [
          h("figcaption", {}, run.name + " · " + (run.summary.model || "") + " · n=" + (run.summary.n || "–")),
          heatmap({
            layers: site.layers, positions: run.positions, value: (li, pi) => view.auc[li][pi], fill: aucColour,
            shade: aucShade, region: view.region, selected: null, showValues: compare.values, compact: true,
            mark: (li, pi) => belowControls(run, "mean", view.auc[li][pi]),
            label: "probe AUC of " + run.name + ", mean over seeds",
            describe: (li, pi) => [run.name].concat(describeCell(run, compare.site, "mean", li, pi)),
            onSelect: (li, pi) => { showTab(k); document.getElementById("run-" + k).selectCell(compare.site, li, pi); },
          }),
        ]));
      });
      root.replaceChildren(h("h2", {}, "Compare runs"), controls,
        h("p", {class: "hint"}, "Mean AUC over each run's seeds, on one colour scale. Click a cell to open it in its run."),
        aucLegend(null, RUNS.some((run) => run.control)), side, differenceMap());
    }
    draw();
    return root;
  }

  function differenceMap() {
    const A = RUNS[compare.a], B = RUNS[compare.b];
    const siteA = A.sites[compare.site], siteB = B.sites[compare.site];
    const box = h("section", {class: "difference", id: "difference"});
    const title = h("h3", {}, "Difference: B − A (" + B.name + " minus " + A.name + ")");
    if (!siteA || !siteB) {
      box.append(title, h("p", {}, "Both runs need " + compare.site + " probes."));
      return box;
    }
    // same axes: layers by index, positions by name; a cell either run lacks stays grey
    const layers = Array.from(new Set(siteA.layers.concat(siteB.layers))).sort((x, y) => x - y);
    const positions = A.positions.concat(B.positions.filter((p) => !A.positions.includes(p)));
    const lookup = (run, site, li, pi, what) => {
      const l = site.layers.indexOf(layers[li]), p = run.positions.indexOf(positions[pi]);
      return l < 0 || p < 0 ? null : site.views.mean[what || "auc"][l][p];
    };
    const diff = layers.map((_, li) => positions.map((__, pi) => {
      const a = lookup(A, siteA, li, pi), b = lookup(B, siteB, li, pi);
      return a === null || b === null ? null : b - a;
    }));
    // Beyond noise: |B − A| > 1.96 √(se_A² + se_B²), each se read off its cell's 95% interval (width / 3.92).
    // The two runs' test answers are taken as independent: where they share answers the test is conservative.
    const noise = layers.map((_, li) => positions.map((__, pi) => {
      const se = [[A, siteA], [B, siteB]].map(([run, site]) => {
        const lo = lookup(run, site, li, pi, "auc_lo"), hi = lookup(run, site, li, pi, "auc_hi");
        return lo === null || hi === null ? null : (hi - lo) / 3.92;
      });
      return se[0] === null || se[1] === null ? null : 1.96 * Math.sqrt(se[0] * se[0] + se[1] * se[1]);
    }));
    const beyond = (li, pi) => diff[li][pi] !== null && noise[li][pi] !== null && Math.abs(diff[li][pi]) > noise[li][pi];
    let counted = 0;
    layers.forEach((_, li) => positions.forEach((__, pi) => { if (diff[li][pi] !== null && noise[li][pi] !== null) counted += 1; }));
    const outside = layers.reduce((total, _, li) => total + positions.filter((__, pi) => beyond(li, pi)).length, 0);
    const biggest = Math.max(0, ...diff.flat().filter((v) => v !== null).map(Math.abs));
    const range = Math.max(0.05, Math.ceil(biggest * 20 - 1e-9) / 20);
    const fillOf = (v) => (v === null ? NO_VALUE : colour(DATA.palette.difference, 0.5 + v / (2 * range)));
    const note = siteA.layers.length !== siteB.layers.length
      ? "The runs have different depths (" + siteA.layers.length + " and " + siteB.layers.length + " rows); layers are matched by index."
      : "Layers matched by index, positions by name.";
    box.append(title, h("p", {class: "hint"}, note + " Positive (purple): B's probes detect errors better there."),
      h("p", {class: "hint noise-count"}, counted === 0 ? "No difference can be judged against noise: a run has no intervals." :
        outside + " of " + counted + " differences are beyond noise (framed): " +
        "|B − A| above 1.96 × √(se_A² + se_B²), each se from its cell's 95% interval, the runs' test answers taken as " +
        "independent (conservative where they share answers). Over many cells a few exceed it by chance (about 5%)."),
      legend(DATA.palette.difference, -range, range, [-range, -range / 2, 0, range / 2, range], "AUC difference B − A",
        [swatch("none", "missing in a run"), swatch("beyond-noise", "framed: beyond noise")]),
      heatmap({
        layers: layers, positions: positions, value: (li, pi) => diff[li][pi], fill: fillOf,
        shade: (v) => Math.abs(v) / range, region: null, selected: null, showValues: compare.values, digits: 2, compact: true,
        frame: beyond,
        label: "AUC difference B minus A: layers down, token positions across",
        describe: (li, pi) => {
          const a = lookup(A, siteA, li, pi), b = lookup(B, siteB, li, pi), d = diff[li][pi];
          return ["layer " + layers[li] + " · " + positions[pi] + " · " + compare.site,
            "A " + fmt(a) + " · B " + fmt(b),
            "B − A " + (d === null ? "–" : signed(d)) + (noise[li][pi] === null ? " (no interval: noise unknown)"
              : beyond(li, pi) ? " — beyond noise (±" + fmt(noise[li][pi]) + ")" : " — within noise (±" + fmt(noise[li][pi]) + ")")];
        },
        onSelect: null,
      }));
    return box;
  }

  // ---- the page: a tab per run, and a comparison tab when there are several ------------------
  const app = document.getElementById("app");
  const tabs = h("div", {class: "tabs", role: "tablist", "aria-label": "runs"});
  const panels = [];
  const tabButtons = [];

  function showTab(k) {
    tabButtons.forEach((button, j) => {
      button.setAttribute("aria-selected", j === k ? "true" : "false");
      button.tabIndex = j === k ? 0 : -1;
    });
    panels.forEach((panel, j) => { panel.hidden = j !== k; });
    hideTip();
  }

  RUNS.forEach((run, k) => {
    const panel = renderRun(k);
    panel.id = "run-" + k;
    panel.setAttribute("role", "tabpanel");
    panels.push(panel);
    tabButtons.push(h("button", {type: "button", role: "tab", id: "tab-" + k, "aria-controls": "run-" + k}, run.name));
  });
  if (RUNS.length > 1) {
    const panel = renderCompare();
    panel.setAttribute("role", "tabpanel");
    panels.push(panel);
    tabButtons.push(h("button", {type: "button", role: "tab", id: "tab-compare", "aria-controls": "compare"}, "Compare runs"));
  }
  tabButtons.forEach((button, k) => {
    button.addEventListener("click", () => showTab(k));
    button.addEventListener("keydown", (e) => {
      const step = {ArrowRight: 1, ArrowLeft: -1}[e.key];
      if (!step) return;
      const next = (k + step + tabButtons.length) % tabButtons.length;
      showTab(next);
      tabButtons[next].focus();
    });
  });
  tabs.append(...tabButtons);
  const header = h("header", {class: "page-head"}, [
    h("h1", {}, "truthmap report"),
    h("p", {class: "hint"}, "Linear probes on a language model's hidden states, predicting that its own answer is wrong."),
  ]);
  app.append(header);
  if (RUNS.length > 1) app.append(tabs);
  app.append(...panels, tip);
  showTab(0);
})();
