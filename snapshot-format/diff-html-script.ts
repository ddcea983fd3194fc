// The inline script of the HTML diff report (diff-html.ts): reads the JSON
// block, builds one row per region (label, canvas strip, view range) and draws
// each strip. Plain ES2020 for any current browser; it must never contain the
// text "</script" (diff-html.ts puts it inside a <script> element verbatim and
// the page's Content-Security-Policy allows exactly this text, by its hash).
//
// Drawing: a strip shows the page range [v0, v1) of its region; pixel x covers
// pages [v0 + x·ppx, v0 + (x+1)·ppx) and is coloured by the fraction of that
// span that changed pages cover, computed from the run lengths in O(log runs)
// per pixel (changedBefore(p): changed pages below page p, fractional p too).
// Zoom: a click zooms ×8 around the page clicked, a drag zooms to the dragged
// range, "−" zooms out ×8, "reset" shows the whole region again; the narrowest
// view is 8 pages, where page borders are drawn. Hovering names the page (or
// the pages) under the pointer and how many of them changed. A URL fragment
// "#zoom=<region index>:<first page>-<end page>" opens a strip zoomed in.
// When done it sets document.body.dataset.rendered = "ok" (or "error: …").
export const DIFF_HTML_SCRIPT = String.raw`
(function () {
  'use strict';
  var body = document.body;
  try {
    var data = JSON.parse(document.getElementById('wpsnap-diff-data').textContent);
    var C = data.colors, P = BigInt(data.pageSize), MIN_SPAN = 8, HEIGHT = 22;
    var strips = [], drawn = 0;
    var rgb = function (hex) { var v = parseInt(hex.slice(1), 16); return [(v >> 16) & 255, (v >> 8) & 255, v & 255]; };
    var RED = rgb(C.page), ONE_SIDE = rgb(C.oneSide);
    var num = function (n) { return String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ','); };
    var pages = function (n, what) { return num(n) + ' ' + (what ? what + ' ' : '') + (n === 1 ? 'page' : 'pages'); };
    var size = function (bytes) {
      var u = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'], i = 0, v = bytes;
      while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
      return i === 0 ? bytes + ' B' : (v >= 100 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, '')) + ' ' + u[i];
    };
    var el = function (tag, cls, text) {
      var e = document.createElement(tag);
      if (cls) e.className = cls;
      if (text !== undefined) e.textContent = text;
      return e;
    };

    function decode(R) {
      R.start = BigInt(R.s);
      R.starts = []; R.ends = []; R.cum = [0];
      if (!R.r) return;
      var pos = 0;
      for (var i = 0; i + 1 < R.r.length; i += 2) {
        pos += R.r[i];
        R.starts.push(pos); R.ends.push(pos + R.r[i + 1]);
        R.cum.push(R.cum[R.cum.length - 1] + R.r[i + 1]);
        pos += R.r[i + 1];
      }
      drawn += R.cum[R.cum.length - 1];
    }
    // Changed pages below page offset p (p may be fractional: a page counts in proportion).
    function changedBefore(R, p) {
      if (!R.r) return R.c * Math.min(p, R.n) / R.n;
      var lo = 0, hi = R.ends.length;
      while (lo < hi) { var mid = (lo + hi) >> 1; if (R.ends[mid] > p) hi = mid; else lo = mid + 1; }
      return R.cum[lo] + (lo < R.starts.length && R.starts[lo] < p ? p - R.starts[lo] : 0);
    }
    function address(R, page) { return '0x' + (R.start + BigInt(Math.floor(page)) * P).toString(16); }

    function draw(S) {
      var R = S.R, cv = S.canvas, dpr = window.devicePixelRatio || 1;
      var w = Math.max(1, Math.round(cv.clientWidth * dpr)), h = Math.max(1, Math.round(HEIGHT * dpr));
      if (cv.width !== w) cv.width = w;
      if (cv.height !== h) cv.height = h;
      var g = cv.getContext('2d'), img = g.createImageData(w, h), px = img.data;
      var ppx = (S.v1 - S.v0) / w, base = rgb(C[R.st]);
      for (var x = 0; x < w; x++) {
        var a = S.v0 + x * ppx, b = a + ppx;
        var d = (changedBefore(R, b) - changedBefore(R, a)) / ppx;
        var bg = a >= R.k && R.k < R.n ? ONE_SIDE : base;
        var t = d <= 0 ? 0 : d >= 0.999 ? 1 : 0.35 + 0.65 * d;
        for (var c = 0; c < 3; c++) px[x * 4 + c] = Math.round(bg[c] + (RED[c] - bg[c]) * t);
        px[x * 4 + 3] = 255;
      }
      for (var y = 1; y < h; y++) px.copyWithin(y * w * 4, 0, w * 4);
      g.putImageData(img, 0, 0);
      if (1 / ppx >= 6) { // page borders
        g.fillStyle = 'rgba(0,0,0,0.35)';
        for (var p = Math.ceil(S.v0); p < S.v1; p++) g.fillRect(Math.round((p - S.v0) / ppx), 0, 1, h);
      }
      if (S.drag && S.drag.x1 !== undefined) {
        g.fillStyle = 'rgba(30,90,200,0.3)';
        var x0 = Math.min(S.drag.x0, S.drag.x1) * dpr, x1 = Math.max(S.drag.x0, S.drag.x1) * dpr;
        g.fillRect(x0, 0, Math.max(1, x1 - x0), h);
      }
      S.from.textContent = address(R, S.v0);
      S.to.textContent = address(R, S.v1);
      var span = S.v1 - S.v0;
      S.mid.textContent = span === R.n ? pages(R.n) : num(span) + ' of ' + pages(R.n) + ' (×' + (R.n / span).toFixed(R.n / span < 10 ? 1 : 0) + ')';
      S.row.dataset.view = S.v0 + '-' + S.v1;
    }

    function setView(S, a, b) {
      var n = S.R.n, span = Math.min(n, Math.max(MIN_SPAN, Math.round(b - a)));
      var v0 = Math.max(0, Math.min(Math.round(a), n - span));
      S.v0 = v0; S.v1 = v0 + span;
      draw(S);
    }
    function pageAt(S, clientX) {
      var r = S.canvas.getBoundingClientRect();
      var f = Math.max(0, Math.min(1, (clientX - r.left) / Math.max(1, r.width)));
      return { x: clientX - r.left, p: S.v0 + f * (S.v1 - S.v0) };
    }
    function hover(S, clientX) {
      var R = S.R, at = pageAt(S, clientX), r = S.canvas.getBoundingClientRect();
      var per = (S.v1 - S.v0) / Math.max(1, r.width);
      if (per <= 1) {
        var p = Math.min(Math.floor(at.p), R.n - 1), changed = R.r ? changedBefore(R, p + 1) - changedBefore(R, p) > 0 : null;
        S.info.textContent = 'page ' + address(R, p) + (p >= R.k && R.k < R.n ? ' (one side only)' : '') + (changed === null ? '' : changed ? ': changed' : ': unchanged');
      } else {
        var a = Math.floor(at.p), b = Math.min(R.n, Math.ceil(at.p + per));
        S.info.textContent = address(R, a) + '–' + address(R, b) + ': ' + num(Math.round(changedBefore(R, b) - changedBefore(R, a))) + ' of ' + pages(b - a) + ' changed';
      }
    }

    function strip(R, i) {
      decode(R);
      var row = el('div', 'strip'), lab = el('div', 'lab'), view = el('div', 'view');
      var text = R.s + '–' + R.e + '  ' + size(Number(BigInt(R.e) - R.start)) + '  ' + (R.path || '(anonymous)') + '  ' + R.perms + '  ' + R.st
        + (R.a ? ' (A: to ' + R.a + ')' : '') + '  ·  ' + pages(R.c, 'changed') + (R.u ? ', ' + num(R.u) + ' unknown' : '')
        + (R.r ? '' : ' (positions not recorded)');
      lab.appendChild(el('span', 'text mono', text)).title = text;
      var out = el('button', '', '−'), reset = el('button', '', 'reset');
      out.type = reset.type = 'button';
      out.title = 'zoom out ×8'; reset.title = 'show the whole region';
      lab.appendChild(out); lab.appendChild(reset);
      var cv = el('canvas');
      cv.dataset.region = String(i);
      var S = { R: R, row: row, canvas: cv, v0: 0, v1: R.n, drag: null,
        from: el('span', 'addr'), mid: el('span', 'info'), to: el('span', 'addr') };
      S.info = S.mid;
      view.appendChild(S.from); view.appendChild(S.mid); view.appendChild(S.to);
      row.appendChild(lab); row.appendChild(cv); row.appendChild(view);
      row.dataset.status = R.st;
      out.addEventListener('click', function () { var c = (S.v0 + S.v1) / 2, s = (S.v1 - S.v0) * 8; setView(S, c - s / 2, c + s / 2); });
      reset.addEventListener('click', function () { setView(S, 0, R.n); });
      cv.addEventListener('mousedown', function (e) { if (e.button === 0) { S.drag = { x0: pageAt(S, e.clientX).x, p0: pageAt(S, e.clientX).p }; e.preventDefault(); } });
      cv.addEventListener('mousemove', function (e) {
        if (S.drag) { S.drag.x1 = pageAt(S, e.clientX).x; draw(S); }
        hover(S, e.clientX);
      });
      cv.addEventListener('mouseleave', function () { if (!S.drag) draw(S); });
      strips.push(S);
      return row;
    }
    window.addEventListener('mouseup', function (e) {
      strips.forEach(function (S) {
        if (!S.drag) return;
        var d = S.drag, at = pageAt(S, e.clientX);
        S.drag = null;
        if (Math.abs(at.x - d.x0) > 4) setView(S, Math.min(d.p0, at.p), Math.max(d.p0, at.p));
        else { var s = (S.v1 - S.v0) / 8; setView(S, d.p0 - s / 2, d.p0 + s / 2); }
      });
    });
    var resizing = 0;
    window.addEventListener('resize', function () {
      clearTimeout(resizing);
      resizing = setTimeout(function () { strips.forEach(draw); }, 100);
    });

    var legend = document.getElementById('legend');
    [['same', 'same'], ['changed', 'changed region'], ['added', 'added (only in B)'], ['removed', 'removed (only in A)'],
      ['resized', 'resized'], ['oneSide', 'part only A or B maps'], ['page', 'changed page']].forEach(function (l) {
      var item = el('span'), sw = el('span', 'sw');
      sw.style.background = C[l[0]];
      item.appendChild(sw); item.appendChild(document.createTextNode(l[1]));
      legend.appendChild(item);
    });
    var host = document.getElementById('strips');
    host.textContent = '';
    data.regions.forEach(function (R, i) { host.appendChild(strip(R, i)); });
    strips.forEach(draw);
    // report.html#zoom=<region index>:<first page>-<end page>[&zoom=…] opens zoomed in.
    (location.hash.match(/zoom=\d+:\d+-\d+/g) || []).forEach(function (z) {
      var m = /zoom=(\d+):(\d+)-(\d+)/.exec(z), S = strips[Number(m[1])];
      if (S) setView(S, Number(m[2]), Number(m[3]));
    });
    host.dataset.regions = String(strips.length);
    host.dataset.changedPagesDrawn = String(drawn);
    body.dataset.rendered = 'ok';
  } catch (err) {
    body.dataset.rendered = 'error: ' + (err && err.message ? err.message : String(err));
    throw err;
  }
})();
`;
