// AstolfoMerge — page side of the "AstolfoMerge" tab.
// The WebUI loads every javascript/*.js of an extension (A1111.md §1.3); the standalone app injects
// this file through a page-load event. It polls the tab's hidden "poll" button while the tab is
// visible or a merge is active (the server answers with progress, log and, once, the result), and
// bridges to the WebUI's own checkpoint selector. Nothing here is needed for merging itself.
(function () {
    "use strict";
    var TICK_MS = 500;       // status requests every 0.5 s while a merge is active …
    var IDLE_MS = 2000;      // … and every 2 s while the tab is merely visible
    var STUCK_MS = 15000;    // a poll whose answer never came back is forgotten after this
    var PING_MS = 4000;      // while "Load the merged model" runs: is the WebUI still answering?
    var PING_FAILS = 2;      // … this many unanswered pings in a row: it went away
    var pollSent = 0;
    var lastPoll = 0;
    var lastEvent = "";
    var loadingSince = 0;    // when "Load the merged model" was pressed; 0 when no load is pending
    var lastPing = 0;
    var pingFails = 0;

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

    function showMessage(text) {
        var box = byId("astolfo_merge_message");
        if (!box) return;
        var target = box.querySelector(".prose") || box;
        target.textContent = text;
    }

    function watchLoad(now) {
        // A model load happens inside the WebUI's process: when that process dies (out of memory,
        // killed), the load's answer never comes back. Say so instead of leaving the page waiting.
        if (!loadingSince || now - lastPing < PING_MS) return;
        lastPing = now;
        fetch(new URL("internal/ping", document.baseURI).href, {cache: "no-store"}).then(function () {
            pingFails = 0;             // any answer, even an error page, means the server is up
        }, function () {
            pingFails += 1;
            if (loadingSince && pingFails >= PING_FAILS) {
                loadingSince = 0;
                showMessage("The WebUI stopped answering while it loaded the model (it may have run out of " +
                            "memory). The merged file is kept: restart the WebUI and pick it in the checkpoint list.");
            }
        });
    }

    function tick() {
        var now = Date.now();
        watchLoad(now);
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

    window.astolfoMergeRefreshCheckpoints = refreshWebuiCheckpoints;

    // Called once "Load the merged model" is over, with the title the WebUI loaded ("" when it did not):
    // the WebUI's own picker is set to it (the model is loaded already, so that is only the display).
    window.astolfoMergeSelectCheckpoint = function (name) {
        loadingSince = 0;
        if (name && typeof selectCheckpoint === "function") {
            selectCheckpoint(name);
        }
    };

    function watchLoadButton() {
        var button = byId("astolfo_merge_load");
        if (!button || button.dataset.astolfoWatched) return;
        button.dataset.astolfoWatched = "1";
        button.addEventListener("click", function () {
            loadingSince = lastPing = Date.now();
            pingFails = 0;
        });
    }

    window.astolfoMergeStart = function () {
        watchLoadButton();
        if (!window.astolfoMergeTimer) {
            window.astolfoMergeTimer = setInterval(tick, TICK_MS);
        }
    };

    if (typeof onUiLoaded === "function") {
        onUiLoaded(window.astolfoMergeStart);
    }
})();
