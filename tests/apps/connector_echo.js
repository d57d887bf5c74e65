'use strict';
// The connector_echo test app on the CommonJS connector; its behaviour is in connector_echo_handler.cjs.
const ApmModule = require('../../connectors/apm_module.node.js');
const handle = require('./connector_echo_handler.cjs');

handle.ipc(new ApmModule((session) => handle(session, 'node-cjs')));
