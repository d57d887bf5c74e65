'use strict';
// The reference's Node.js connector example, as it is printed there.
const ApmModule = require('../../connectors/apm_module.node.js')

const apm = new ApmModule(async (session) => {
    if (session.protocol === 'ws') {
        session.onData  = (data, isBinary) => session.write(data)   // echo
        session.onClose = () => {}
        return
    }
    session.write('Hello World', { 'content-type': 'text/plain', 'x-status': '200' })
    session.close()
})

apm.setDashValue(1, 42.5, '#4f8cff')      // push to GUI dashboard panel
apm.metric('myapp.requests', 1, 'counter') // StatsD-style metric
