// AstolfoMerge — page side of the "Merger" tab.
// The WebUI loads every javascript/*.js of an extension (A1111.md §1.3); the standalone app injects
// this file through a page-load event. It polls the tab's hidden "poll" button while the tab is
// visible or a merge is active (the server answers with progress, log and, once, the result), and
// bridges to the WebUI's own checkpoint selector. Nothing here is needed for merging itself.
(function () {
    "use strict";
    var TICK_MS = 500;       // status requests every 0.5 s while a merge is active …
    var IDLE_MS = 2000;      // … and every 2 s while the tab is merely visible
    var STUCK_MS = 15000;    // a poll whose answer never came back is forgotten after this
    var pollSent = 0;
    var lastPoll = 0;
    var lastEvent = "";

    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function byId(id) {
        return root().querySelector("#" + id);
    }

    function pollInterval() {
        // 0 (do not poll), TICK_MS (a merge is active) or IDLE_MS (the tab is visible).
        var progress = byId("astolfo_merge_progress");
        if (!progress || document.hidden) return 0;
        if (progress.querySelector('[data-active="1"]') !== null) return TICK_MS;
        return progress.offsetParent !== null ? IDLE_MS : 0;
    }

    function tick() {
        var now = Date.now();
        if (pollSent && now - pollSent < STUCK_MS) return;
        var interval = pollInterval();
        var button = byId("astolfo_merge_poll");
        if (!button || !interval || now - lastPoll < interval) return;
        pollSent = lastPoll = now;
        button.click();
    }

    function refreshWebuiCheckpoints() {
        // A1111: the quicksettings refresh button; Forge: its own top-row button.
        var ids = ["refresh_sd_model_checkpoint", "forge_refresh_checkpoint"];
        for (var i = 0; i < ids.length; i++) {
            var button = byId(ids[i]);
            if (button) {
                button.click();
                return;
            }
        }
    }

    // Called after every poll answer with the tab's event box ("done:<job id>" once a merge finished).
    window.astolfoMergeAfterPoll = function (event) {
        pollSent = 0;
        var log = byId("astolfo_merge_log");
        var area = log && log.querySelector("textarea");
        if (area) area.scrollTop = area.scrollHeight;   // gradio 3.41 text boxes do not follow their tail
        if (event && event !== lastEvent) {
            lastEvent = event;
            refreshWebuiCheckpoints();
        }
    };

    // Called after "Load the merged model" with the checkpoint title the WebUI knows it by.
    window.astolfoMergeSelectCheckpoint = function (name) {
        if (name && typeof selectCheckpoint === "function") {
            selectCheckpoint(name);
        }
    };

    window.astolfoMergeStart = function () {
        if (!window.astolfoMergeTimer) {
            window.astolfoMergeTimer = setInterval(tick, TICK_MS);
        }
    };

    if (typeof onUiLoaded === "function") {
        onUiLoaded(window.astolfoMergeStart);
    }
})();
