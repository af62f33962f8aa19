/* The sweep report's page script (orchestrator/report/page.py writes the page).
 *
 * Draws the Plotly figures of the #report-data JSON, one dataset at a time and only
 * when shown; a click on a legend entry of a method (colour), a checkpointing strategy
 * (shape) or a backbone (fill) hides or shows those configurations in every plot of the
 * page. The dataset is kept in the URL fragment
 * (#dataset=NAME), so a view can be linked.
 */
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("report-data").textContent);
  var config = {responsive: true, displaylogo: false, scrollZoom: false};
  var hidden = {backbone: {}, checkpointing: {}, method: {}};
  var drawn = {}; // plot id -> the Plotly graph div
  var original = {}; // plot id -> per trace {x, y, z, text} as drawn first

  function plotsOf(dataset) {
    return data.plots.filter(function (p) { return p.dataset === dataset; });
  }

  // point: [backbone, checkpointing, method] (the trace's customdata)
  function keep(point) {
    return !hidden.backbone[point[0]] && !hidden.checkpointing[point[1]] &&
      !hidden.method[point[2]];
  }

  function remember(plot, gd) {
    original[plot.id] = gd.data.map(function (trace) {
      var copy = {};
      ["x", "y", "z", "text"].forEach(function (k) {
        if (Array.isArray(trace[k])) copy[k] = trace[k].slice();
      });
      return copy;
    });
  }

  // Filtered-out points become null: Plotly leaves a gap, and the hover skips them. A
  // trace left with no point is hidden instead (an all-null 3-D scene never settles).
  function applyFilters(id) {
    var gd = drawn[id], points = [], keys = [], visible = [], update = {visible: []};
    gd.data.forEach(function (trace, i) {
      if (trace.meta && trace.meta.filter) {
        keys.push(i);
        visible.push(hidden[trace.meta.filter][trace.meta.value] ? "legendonly" : true);
      } else if (trace.customdata) {
        points.push(i);
      }
    });
    points.forEach(function (i) {
      var orig = original[id][i], where = gd.data[i].customdata;
      var kept = where.filter(keep).length;
      update.visible.push(kept > 0);
      Object.keys(orig).forEach(function (k) {
        (update[k] = update[k] || []).push(orig[k].map(function (v, j) {
          return keep(where[j]) || !kept ? v : null;
        }));
      });
    });
    if (points.length) Plotly.restyle(gd, update, points);
    if (keys.length) Plotly.restyle(gd, {visible: visible}, keys);
  }

  function onLegendClick(ev) {
    var trace = ev.data[ev.curveNumber];
    if (!trace.meta || !trace.meta.filter) return true;
    var set = hidden[trace.meta.filter];
    set[trace.meta.value] = !set[trace.meta.value];
    Object.keys(drawn).forEach(applyFilters);
    return false;
  }

  function draw(plot) {
    var div = document.getElementById("plot-" + plot.id);
    if (drawn[plot.id] || !div) return;
    drawn[plot.id] = div;
    Plotly.newPlot(div, plot.figure.data, plot.figure.layout, config).then(function (gd) {
      remember(plot, gd);
      gd.on("plotly_legendclick", onLegendClick);
      applyFilters(plot.id);
      div.setAttribute("data-drawn", "true");
    });
  }

  function show(dataset) {
    document.querySelectorAll("section.dataset").forEach(function (section) {
      section.hidden = section.getAttribute("data-dataset") !== dataset;
    });
    document.getElementById("dataset").value = dataset;
    history.replaceState(null, "", "#dataset=" + encodeURIComponent(dataset));
    plotsOf(dataset).forEach(function (plot) {
      if (drawn[plot.id]) Plotly.Plots.resize(drawn[plot.id]);
      else draw(plot);
    });
  }

  function start() {
    if (!data.datasets.length) return;
    var select = document.getElementById("dataset");
    data.datasets.forEach(function (d) {
      var option = document.createElement("option");
      option.value = option.textContent = d;
      select.appendChild(option);
    });
    select.addEventListener("change", function () { show(select.value); });
    var asked = new URLSearchParams(location.hash.slice(1)).get("dataset");
    show(data.datasets.indexOf(asked) >= 0 ? asked : data.datasets[0]);
  }

  start();
})();
